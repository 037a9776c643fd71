package shellcmd

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Spec is one command to run.
type Spec struct {
	// Command is given to sh -c as it is.
	Command string
	// Env is added to the runner's own environment; a name set twice
	// takes the value given last.
	Env []string
	// Output receives the command's stdout and stderr merged, line by
	// line, each line under Prefix. Defaults to io.Discard.
	Output io.Writer
	// Prefix starts each line written to Output. Defaults to none.
	Prefix string
	// Redact lists strings (passwords) replaced by "xxxxx" in every line
	// written to Output and kept in the tail. Defaults to none.
	Redact []string
	// TailLines is how many of the last lines Result.Tail keeps. Defaults
	// to 40.
	TailLines int
	// Grace is how long the command has, after SIGTERM when ctx ends, to
	// exit before its process group is killed. Defaults to 5s.
	Grace time.Duration
}

// Result is how a command ended.
type Result struct {
	// ExitCode is the command's exit status; -1 when a signal ended it or
	// it never started.
	ExitCode int `json:"exit_code"`
	// Signal names the signal that ended the command, if one did.
	Signal string `json:"signal,omitempty"`
	// Tail is the command's last lines of output, redacted.
	Tail     []string      `json:"output_tail"`
	Started  time.Time     `json:"started"`
	Duration time.Duration `json:"duration"`
}

// maxLine bounds a line kept in the tail or written to Output; the rest
// of a longer line is cut.
const maxLine = 4096

// Run runs spec.Command with sh -c in a process group of its own and waits
// for it. When ctx ends, the group gets SIGTERM, and SIGKILL after
// spec.Grace. When the command exits, whatever it left running in its
// group is killed too, so nothing of the step outlives it. The error is
// nil only when the command exited with status 0; an *exec.ExitError says
// it did not, and ctx's error is joined in when ctx ended first.
func Run(ctx context.Context, spec Spec) (Result, error) {
	if spec.Output == nil {
		spec.Output = io.Discard
	}
	if spec.TailLines <= 0 {
		spec.TailLines = 40
	}
	if spec.Grace <= 0 {
		spec.Grace = 5 * time.Second
	}
	lines := &lineWriter{out: spec.Output, prefix: spec.Prefix, redact: spec.Redact, keep: spec.TailLines}
	res := Result{ExitCode: -1, Started: time.Now(), Tail: []string{}}
	if err := ctx.Err(); err != nil {
		return res, err // never start what would be killed at once
	}
	// A pipe of our own rather than os/exec's: its copy would wait for
	// every holder of the pipe, leftovers included, before Wait returns.
	pr, pw, err := os.Pipe()
	if err != nil {
		return res, err
	}
	defer pr.Close()
	cmd := exec.Command("sh", "-c", spec.Command)
	cmd.Env = append(os.Environ(), spec.Env...)
	cmd.Stdout, cmd.Stderr = pw, pw // one pipe: the lines keep their order
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	err = cmd.Start()
	pw.Close()
	if err != nil {
		return res, fmt.Errorf("start sh -c: %w", err)
	}
	pgid := cmd.Process.Pid
	copied := make(chan struct{})
	go func() {
		defer close(copied)
		_, _ = io.Copy(lines, pr)
	}()
	exited := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		select {
		case <-exited:
			return
		case <-ctx.Done():
		}
		_ = syscall.Kill(-pgid, syscall.SIGTERM)
		t := time.NewTimer(spec.Grace)
		defer t.Stop()
		select {
		case <-exited:
		case <-t.C:
			_ = syscall.Kill(-pgid, syscall.SIGKILL)
		}
	})
	err = cmd.Wait()
	close(exited)
	wg.Wait()
	// Leftovers of the group go with the command. The group's ID cannot
	// be reused while any member lives, so this reaches no one else.
	_ = syscall.Kill(-pgid, syscall.SIGKILL)
	// A process that left the group may still hold the pipe: read what
	// is there for a moment, then stop.
	select {
	case <-copied:
	case <-time.After(spec.Grace):
		_ = pr.Close()
		<-copied
	}
	lines.flush()
	res.Duration = time.Since(res.Started)
	res.Tail = lines.tail()
	if st, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); ok && st.Signaled() {
		res.Signal = st.Signal().String()
	} else {
		res.ExitCode = cmd.ProcessState.ExitCode()
	}
	if err != nil && ctx.Err() != nil {
		err = errors.Join(err, ctx.Err())
	}
	return res, err
}

// Mask replaces each of secrets in s with "xxxxx".
func Mask(s string, secrets []string) string {
	for _, secret := range secrets {
		if secret != "" {
			s = strings.ReplaceAll(s, secret, "xxxxx")
		}
	}
	return s
}

// lineWriter cuts output into lines, writes each under a prefix, and keeps
// the last ones. os/exec writes to it from one goroutine; the mutex keeps
// tail safe to read after Wait.
type lineWriter struct {
	mu      sync.Mutex
	out     io.Writer
	prefix  string
	redact  []string
	keep    int
	partial []byte
	kept    []string
	next    int // where the next line goes in kept, once it is full
}

func (w *lineWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	n := len(p)
	for len(p) > 0 {
		i := bytes.IndexByte(p, '\n')
		if i < 0 {
			room := max(maxLine-len(w.partial), 0)
			w.partial = append(w.partial, p[:min(len(p), room)]...)
			break
		}
		room := max(maxLine-len(w.partial), 0)
		w.partial = append(w.partial, p[:min(i, room)]...)
		w.emit()
		p = p[i+1:]
	}
	return n, nil
}

// emit writes and keeps the partial line. Output errors are dropped: a
// closed terminal must not fail the command.
func (w *lineWriter) emit() {
	line := Mask(strings.TrimSuffix(string(w.partial), "\r"), w.redact)
	w.partial = w.partial[:0]
	_, _ = io.WriteString(w.out, w.prefix+line+"\n")
	if len(w.kept) < w.keep {
		w.kept = append(w.kept, line)
		return
	}
	w.kept[w.next] = line
	w.next = (w.next + 1) % w.keep
}

func (w *lineWriter) flush() {
	w.mu.Lock()
	defer w.mu.Unlock()
	if len(w.partial) > 0 {
		w.emit()
	}
}

func (w *lineWriter) tail() []string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return append(append([]string{}, w.kept[w.next:]...), w.kept[:w.next]...)
}
