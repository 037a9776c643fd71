package cli

import (
	"io"
	"os"
	"sync"
	"unicode/utf8"

	"github.com/mattn/go-isatty"
	"golang.org/x/sys/unix"
)

// terminal returns w's file descriptor when w is a terminal.
func terminal(w io.Writer) (fd int, ok bool) {
	f, isFile := w.(*os.File)
	if !isFile || !isatty.IsTerminal(f.Fd()) {
		return 0, false
	}
	return int(f.Fd()), true
}

// terminalSize is the terminal's width in columns and height in rows,
// each 0 when it will not say.
func terminalSize(fd int) (cols, rows int) {
	ws, err := unix.IoctlGetWinsize(fd, unix.TIOCGWINSZ)
	if err != nil {
		return 0, 0
	}
	return int(ws.Col), int(ws.Row)
}

// fitWidth cuts s to fit in cols columns (one rune a column), marking a
// cut with "…"; cols of 0 or less keeps s whole.
func fitWidth(s string, cols int) string {
	if cols <= 0 || utf8.RuneCountInString(s) <= cols {
		return s
	}
	r := []rune(s)
	return string(r[:max(cols-1, 0)]) + "…"
}

// statusLine is a writer, stderr, that may show one line redrawn in
// place on a terminal: everything else written to it (log lines, the
// output of a command, the final error) starts on a line of its own
// instead of being glued to the redrawn one.
type statusLine struct {
	mu   sync.Mutex
	w    io.Writer
	fd   int
	tty  bool
	open bool // a redrawn line is shown without its newline
}

func newStatusLine(w io.Writer) *statusLine {
	fd, tty := terminal(w)
	return &statusLine{w: w, fd: fd, tty: tty}
}

// Redraw replaces the shown line with line, cut to the terminal's width
// (a line that wraps cannot be redrawn: the carriage return goes back
// only to the start of its last row). Off a terminal it writes line.
func (s *statusLine) Redraw(line string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.tty {
		_, _ = io.WriteString(s.w, line+"\n")
		return
	}
	// The last column stays free: writing into it leaves some terminals
	// waiting to wrap.
	cols, _ := terminalSize(s.fd)
	_, _ = io.WriteString(s.w, "\r\033[K"+fitWidth(line, cols-1))
	s.open = true
}

// Write writes p, after ending a redrawn line.
func (s *statusLine) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.endLocked()
	return s.w.Write(p)
}

// End ends a redrawn line, so that what comes next starts a line of its
// own.
func (s *statusLine) End() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.endLocked()
}

func (s *statusLine) endLocked() {
	if s.open {
		_, _ = io.WriteString(s.w, "\n")
		s.open = false
	}
}
