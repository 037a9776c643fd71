package bench

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"runtime/pprof"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// CPU is the processor time spent during one measurement, per flip, by
// this process (the broadcaster, the agents and the bench), the broker
// (its whole Erlang VM, so any other client's work too) and this run's
// own PostgreSQL backends (found by the run's application_name; not the
// server's background processes). They are zero where /proc is not
// visible.
type CPU struct {
	SelfMSPerFlip     float64 `json:"self_ms_per_flip"`
	BrokerMSPerFlip   float64 `json:"broker_ms_per_flip"`
	PostgresMSPerFlip float64 `json:"postgres_ms_per_flip"`
	WallMSPerFlip     float64 `json:"wall_ms_per_flip"`
}

// cpuMark is a reading of the clocks.
type cpuMark struct {
	e        *env
	self     time.Duration
	broker   time.Duration
	backends map[int]time.Duration // this run's PostgreSQL backends, by pid
	at       time.Time
}

func (e *env) cpuNow(ctx context.Context) cpuMark {
	m := cpuMark{e: e, at: time.Now(), backends: map[int]time.Duration{}}
	var ru syscall.Rusage
	if syscall.Getrusage(syscall.RUSAGE_SELF, &ru) == nil {
		m.self = time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	}
	m.broker = brokerCPU()
	var pids []int
	_ = e.store.DB().SelectContext(ctx, &pids, `SELECT pid FROM pg_stat_activity WHERE application_name = $1`, e.appName)
	for _, pid := range pids {
		if d, ok := procCPU(fmt.Sprintf("/proc/%d/stat", pid)); ok {
			m.backends[pid] = d
		}
	}
	return m
}

// per returns the CPU spent since m, per flip. A backend that started
// since m counts whole; one that ended is lost (the pools keep theirs).
func (m cpuMark) per(ctx context.Context, flips int) CPU {
	now := m.e.cpuNow(ctx)
	var pg time.Duration
	for pid, d := range now.backends {
		pg += d - m.backends[pid]
	}
	f := float64(max(flips, 1))
	return CPU{
		SelfMSPerFlip:     ms(now.self-m.self) / f,
		BrokerMSPerFlip:   ms(now.broker-m.broker) / f,
		PostgresMSPerFlip: ms(pg) / f,
		WallMSPerFlip:     ms(now.at.Sub(m.at)) / f,
	}
}

// clockTick is USER_HZ, which is 100 on every Linux this runs on.
const clockTick = 10 * time.Millisecond

// brokerCPU sums the user and system time of RabbitMQ's Erlang VM
// (beam.smp).
func brokerCPU() time.Duration {
	var total time.Duration
	stats, _ := filepath.Glob("/proc/[0-9]*/stat")
	for _, path := range stats {
		b, err := os.ReadFile(path)
		if err != nil || !bytes.Contains(b, []byte("(beam")) {
			continue
		}
		if d, ok := parseStat(string(b)); ok {
			total += d
		}
	}
	return total
}

// brokerRSS sums the resident memory of RabbitMQ's Erlang VM
// (beam.smp), in bytes; 0 where /proc is not visible.
func brokerRSS() int64 {
	var total int64
	stats, _ := filepath.Glob("/proc/[0-9]*/stat")
	for _, path := range stats {
		b, err := os.ReadFile(path)
		if err != nil || !bytes.Contains(b, []byte("(beam")) {
			continue
		}
		status, err := os.ReadFile(filepath.Join(filepath.Dir(path), "status"))
		if err != nil {
			continue
		}
		for line := range strings.SplitSeq(string(status), "\n") {
			var kb int64
			if _, err := fmt.Sscanf(line, "VmRSS: %d kB", &kb); err == nil {
				total += kb << 10
			}
		}
	}
	return total
}

func procCPU(path string) (time.Duration, bool) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, false
	}
	return parseStat(string(b))
}

// parseStat reads utime + stime from a /proc/PID/stat line. The command
// name, in parentheses, may hold spaces: fields are counted after it.
func parseStat(s string) (time.Duration, bool) {
	end := strings.LastIndexByte(s, ')')
	if end < 0 || end+2 > len(s) {
		return 0, false
	}
	// Fields after the command: state is field 3; utime and stime are
	// fields 14 and 15.
	f := strings.Fields(s[end+2:])
	if len(f) < 13 {
		return 0, false
	}
	ut, err1 := strconv.ParseInt(f[11], 10, 64)
	st, err2 := strconv.ParseInt(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, false
	}
	return time.Duration(ut+st) * clockTick, true
}

// profile starts a CPU profile named name in Options.ProfileDir, if set,
// and returns the function that stops it.
func (e *env) profile(name string) (stop func(), err error) {
	if e.opts.ProfileDir == "" {
		return func() {}, nil
	}
	if err := os.MkdirAll(e.opts.ProfileDir, 0o755); err != nil {
		return nil, err
	}
	f, err := os.Create(filepath.Join(e.opts.ProfileDir, name+".prof"))
	if err != nil {
		return nil, err
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		f.Close()
		return nil, fmt.Errorf("profile %s: %w", name, err)
	}
	return func() { pprof.StopCPUProfile(); f.Close() }, nil
}
