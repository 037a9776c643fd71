package testenv

import (
	"bytes"
	"strings"
	"sync"
)

// LogBuffer collects what a test's goroutines or commands write (a
// zerolog destination, a command's stdout or stderr) and is safe to read
// while they write. The zero value is ready to use.
type LogBuffer struct {
	// OnWrite, if set, hears each write after it is kept, outside the
	// buffer's lock, so it may read the buffer or do slow work.
	OnWrite func(string)

	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *LogBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	b.buf.Write(p)
	b.mu.Unlock()
	if b.OnWrite != nil {
		b.OnWrite(string(p))
	}
	return len(p), nil
}

// String returns everything written so far.
func (b *LogBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// Count returns how many lines written so far contain every one of subs.
func (b *LogBuffer) Count(subs ...string) int {
	n := 0
	for line := range strings.Lines(b.String()) {
		ok := true
		for _, sub := range subs {
			if !strings.Contains(line, sub) {
				ok = false
				break
			}
		}
		if ok {
			n++
		}
	}
	return n
}
