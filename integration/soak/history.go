package soak

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"sync"
	"time"
)

// Kinds of history events, one JSON line each.
const (
	// EventStart: the agent started. At is taken before agent.Start was
	// called, Epoch is the snapshot's epoch once it returned.
	EventStart = "start"
	// EventApply: a newer snapshot was swapped in (agent.Config.OnChange,
	// which runs before the acknowledgement for it is sent).
	EventApply = "apply"
	// EventBegin: a unit of work entered the agent; At is taken after Enter
	// returned, so the guard was open at At.
	EventBegin = "begin"
	// EventEnd: the unit of work is done; At is taken before Exit, so the
	// guard was still open at At.
	EventEnd = "end"
	// EventStop: the service stopped gracefully.
	EventStop = "stop"
)

// Outcomes of a unit of work.
const (
	OutcomeOK        = "ok"
	OutcomeError     = "error"
	OutcomeCancelled = "cancelled" // the service was stopping
)

// Event is one line of a service process's history. Times are wall-clock
// Unix nanoseconds: every process of a soak runs on one machine, so the
// services and the runner read the same clock (see the checker for why
// not the database's).
type Event struct {
	Kind  string `json:"k"`
	At    int64  `json:"t"`
	Agent string `json:"agent,omitempty"` // start
	PID   int    `json:"pid,omitempty"`   // start
	HasDB bool   `json:"db,omitempty"`    // start: the agent has a store handle
	Unit  int64  `json:"u,omitempty"`     // begin, end
	Epoch int64  `json:"epoch,omitempty"` // start, apply, begin: the snapshot's epoch
	// Table and Columns are what the unit of work named: the table and the
	// snapshot's columns of it.
	Table    string   `json:"table,omitempty"`
	Columns  []string `json:"cols,omitempty"`
	Outcome  string   `json:"outcome,omitempty"`  // end
	SQLState string   `json:"sqlstate,omitempty"` // end, on a PostgreSQL error
	Error    string   `json:"error,omitempty"`    // end
	Refused  int64    `json:"refused,omitempty"`  // stop: Enter refused with ErrStale
}

// HistoryWriter appends events to a file, one write per line and no
// buffering, so that a process killed with SIGKILL loses nothing it logged.
type HistoryWriter struct {
	mu sync.Mutex
	f  *os.File
}

// CreateHistory opens path for appending.
func CreateHistory(path string) (*HistoryWriter, error) {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return nil, err
	}
	return &HistoryWriter{f: f}, nil
}

// Write appends one event. Errors are returned, not hidden: a history
// with holes would make the checker's verdict worthless.
func (w *HistoryWriter) Write(e Event) error {
	b, err := json.Marshal(e)
	if err != nil {
		return err
	}
	b = append(b, '\n')
	w.mu.Lock()
	defer w.mu.Unlock()
	_, err = w.f.Write(b)
	return err
}

// Close closes the file.
func (w *HistoryWriter) Close() error { return w.f.Close() }

// ReadHistory calls fn for every event of a history file. A last line
// cut short by SIGKILL is ignored; any other bad line is an error.
func ReadHistory(path string, fn func(Event)) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64*1024), 4*1024*1024)
	var pending error
	for n := 1; sc.Scan(); n++ {
		if pending != nil {
			return pending
		}
		var e Event
		if err := json.Unmarshal(sc.Bytes(), &e); err != nil {
			pending = fmt.Errorf("%s:%d: %w", path, n, err)
			continue
		}
		fn(e)
	}
	return sc.Err()
}

// Now is the clock every history event is stamped with.
func Now() int64 { return time.Now().UnixNano() }

// ServiceConfig is what the runner tells one soak service process, as a
// JSON file named by its -config flag.
type ServiceConfig struct {
	ID      string `json:"id"`
	Service string `json:"service"`
	// StoreURL is the agent's store connection (through a fault proxy);
	// empty means the agent has no database handle.
	StoreURL string `json:"store_url,omitempty"`
	// WorkURL is the database the workers query (not proxied).
	WorkURL  string              `json:"work_url"`
	AMQPURL  string              `json:"amqp_url"`
	Schema   string              `json:"schema"`
	Prefix   string              `json:"prefix"`
	Releases []string            `json:"releases"`
	Tables   map[string][]string `json:"tables"`
	// ItemTables are the tables that are never dropped, so a worker always
	// has somewhere to work.
	ItemTables []string `json:"item_tables"`
	Workers    int      `json:"workers"`
	// Pause is each worker's think time between units of work; Hold the
	// longest time a unit keeps its guard between its two statements.
	Pause             time.Duration `json:"pause"`
	Hold              time.Duration `json:"hold"`
	Seed              uint64        `json:"seed"`
	History           string        `json:"history"`
	HeartbeatInterval time.Duration `json:"heartbeat_interval"`
	LeaseMargin       time.Duration `json:"lease_margin"`
	InitialLease      time.Duration `json:"initial_lease"`
	ConfirmInterval   time.Duration `json:"confirm_interval"`
}
