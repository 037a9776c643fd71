package fleet

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/phasecast/phasecast/agent"
	"github.com/phasecast/phasecast/examples/novalike"
	"github.com/phasecast/phasecast/internal/config"
	"github.com/phasecast/phasecast/internal/keys"
	"github.com/phasecast/phasecast/internal/retry"
)

// Python is the interpreter the Python agent runs on: Debian's, the one
// that sees the python3-* packages. The python3 first on PATH may be
// another build.
const Python = "/usr/bin/python3"

// PythonModule is a module the Python agent or its tests import, and the
// Debian package that provides it.
type PythonModule struct{ Module, Package string }

// PythonModules are what python/examples/novalike.py needs: the agent's
// broker client, database driver and signatures, and SQLAlchemy.
var PythonModules = []PythonModule{
	{"kombu", "python3-kombu"},
	{"psycopg2", "python3-psycopg2"},
	{"cryptography", "python3-cryptography"},
	{"sqlalchemy", "python3-sqlalchemy"},
}

// PythonTestModules are what the Python agent's unit tests need besides:
// they also run the agent under eventlet, as OpenStack services do.
var PythonTestModules = append(slices.Clone(PythonModules), PythonModule{"eventlet", "python3-eventlet"})

// CheckPython returns nil if Python runs and imports every module, and
// otherwise an error that says what to install.
func CheckPython(ctx context.Context, modules []PythonModule) error {
	install := func(pkgs []string) string { return "apt-get install -y " + strings.Join(pkgs, " ") }
	all := make([]string, len(modules))
	for i, m := range modules {
		all[i] = m.Package
	}
	if _, err := os.Stat(Python); err != nil {
		return fmt.Errorf("the Python agent needs %s (Debian's python3) with its packages; install them with: %s", Python, install(append([]string{"python3"}, all...)))
	}
	// Prints the modules that will not import, one a line.
	script := "import importlib, sys\nfor m in sys.argv[1:]:\n    try:\n        importlib.import_module(m)\n    except Exception:\n        print(m)\n"
	args := []string{"-c", script}
	for _, m := range modules {
		args = append(args, m.Module)
	}
	cmd := exec.CommandContext(ctx, Python, args...)
	cmd.Env = append(os.Environ(), "PYTHONDONTWRITEBYTECODE=1")
	out, err := cmd.Output()
	if err != nil {
		return fmt.Errorf("%s does not run (%w); install it and the packages with: %s", Python, err, install(append([]string{"python3"}, all...)))
	}
	var missing []string
	for _, name := range strings.Fields(string(out)) {
		for _, m := range modules {
			if m.Module == name {
				missing = append(missing, m.Package)
			}
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("%s cannot import %s; install with: %s", Python, strings.TrimSpace(strings.ReplaceAll(string(out), "\n", ", ")), install(missing))
	}
	return nil
}

// PythonDir finds the repository's python/ directory (the phasecast
// package and examples/novalike.py) in dir or the nearest of its parents
// that holds one.
func PythonDir(dir string) (string, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return "", err
	}
	for d := abs; ; d = filepath.Dir(d) {
		py := filepath.Join(d, "python")
		if _, err := os.Stat(filepath.Join(py, NovalikePy)); err == nil {
			return py, nil
		}
		if filepath.Dir(d) == d {
			return "", fmt.Errorf("no python/%s in %s or any directory above it: run from the phasecast repository", NovalikePy, abs)
		}
	}
}

// NovalikePy is the Python example service, relative to the python/
// directory.
const NovalikePy = "examples/novalike.py"

// PythonConfig configures one novalike.py process.
type PythonConfig struct {
	// Dir is the repository's python/ directory (PythonDir). Required.
	Dir string
	// Service names the service. Required.
	Service string
	// ID is the agent's ID. Defaults to agent.NewID(Service).
	ID string
	// Table is the instances table, as the manifest spells it. Required.
	Table string
	// Workers defaults to 2.
	Workers int
	// Releases defaults to ["L"].
	Releases []string
	// HoldGuard, when positive, has the service hold one guard open that
	// long once it serves (novalike.py --hold-guard).
	HoldGuard time.Duration
}

// PythonService is one running novalike.py process. Its stdout is the one
// JSON line of its Result; its stderr, the log, is kept for errors.
type PythonService struct {
	id        string
	service   string
	dir       string // a directory of its own, for readyFile
	readyFile string
	cmd       *exec.Cmd
	stdout    bytes.Buffer
	stderr    tailBuffer
	done      chan struct{} // closed once the process has exited
	waitErr   error         // set before done is closed

	stopOnce sync.Once
	res      novalike.Result
	stopErr  error
}

// StartPython starts a novalike.py process against the env and waits
// until it serves (its agent started, its workers run), as StartServices
// waits for Start, or until the process exits or ctx ends.
// Its database and broker URLs and the state public key go through the
// environment, never the command line.
func (e *Env) StartPython(ctx context.Context, cfg PythonConfig) (*PythonService, error) {
	if cfg.ID == "" {
		cfg.ID = agent.NewID(cfg.Service)
	}
	if cfg.Workers <= 0 {
		cfg.Workers = 2
	}
	if cfg.Releases == nil {
		cfg.Releases = []string{"L"}
	}
	args := []string{filepath.Join(cfg.Dir, NovalikePy),
		"--service", cfg.Service, "--id", cfg.ID, "--table", cfg.Table,
		"--workers", strconv.Itoa(cfg.Workers), "--releases", strings.Join(cfg.Releases, ","),
		"--schema", e.Store.Schema(), "--exchange-prefix", e.Prefix}
	if cfg.HoldGuard > 0 {
		args = append(args, "--hold-guard", cfg.HoldGuard.String())
	}
	env := pythonEnv(cfg.Dir, e.DatabaseURL, e.AMQPURL)
	if e.StateKey != nil {
		env = append(env, keys.EnvStatePub+"="+base64.StdEncoding.EncodeToString(e.StateKey.Public().(ed25519.PublicKey)))
	} else {
		args = append(args, "--insecure")
	}
	dir, err := os.MkdirTemp("", "phasecast-novalike-py-")
	if err != nil {
		return nil, err
	}
	p := &PythonService{id: cfg.ID, service: cfg.Service, dir: dir, readyFile: filepath.Join(dir, "ready"), done: make(chan struct{})}
	args = append(args, "--ready-file", p.readyFile)
	p.cmd = exec.Command(Python, args...)
	p.cmd.Env = env
	p.cmd.SysProcAttr = childProcAttr()
	p.cmd.Stdout, p.cmd.Stderr = &p.stdout, &p.stderr
	if err := p.cmd.Start(); err != nil {
		p.cleanup()
		return nil, fmt.Errorf("start %s: %w", cfg.Service, err)
	}
	go func() {
		p.waitErr = p.cmd.Wait()
		close(p.done)
	}()
	err = p.awaitReady(ctx)
	select {
	case <-p.done:
		p.cleanup()
		return nil, fmt.Errorf("%s (%s) exited before it served: %v\n%s", cfg.Service, cfg.ID, p.waitErr, p.stderr.String())
	default:
	}
	if err != nil {
		p.kill()
		p.cleanup()
		return nil, fmt.Errorf("%s (%s) did not serve: %w\n%s", cfg.Service, cfg.ID, err, p.stderr.String())
	}
	return p, nil
}

// pythonStartLimit bounds a Python service's start: the interpreter's
// imports, then its agent's (Start's own timeout is 30s).
const pythonStartLimit = time.Minute

// awaitReady waits until the process writes its ready file (novalike.py
// --ready-file: the agent started, the workers run), the process exits,
// pythonStartLimit passes or ctx ends.
func (p *PythonService) awaitReady(ctx context.Context) error {
	deadline := time.Now().Add(pythonStartLimit)
	for {
		select {
		case <-p.done:
			return nil
		default:
		}
		if _, err := os.Stat(p.readyFile); err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("not serving within %s", pythonStartLimit)
		}
		if err := retry.Sleep(ctx, 20*time.Millisecond); err != nil {
			return err
		}
	}
}

// pythonEnv is the environment of a Python process of the repository:
// this process's, without its phasecast keys (the caller passes those it
// means to), with the package on the path and the servers' URLs.
func pythonEnv(dir, databaseURL, amqpURL string) []string {
	var env []string
	for _, kv := range os.Environ() {
		name, _, _ := strings.Cut(kv, "=")
		switch name {
		case keys.EnvStatePub, keys.EnvStatusMAC, keys.EnvStateKey, "PYTHONPATH":
			continue
		}
		env = append(env, kv)
	}
	return append(env, "PYTHONPATH="+dir, "PYTHONDONTWRITEBYTECODE=1",
		config.EnvDatabaseURL+"="+databaseURL, config.EnvAMQPURL+"="+amqpURL)
}

// ID is the service's agent ID.
func (p *PythonService) ID() string { return p.id }

// Log is the tail of what the process wrote on stderr so far.
func (p *PythonService) Log() string { return p.stderr.String() }

// Stop sends SIGTERM, waits for the process to exit (killing it if ctx
// ends first) and returns the Result it printed. Only the first call
// stops anything; later calls report the same.
func (p *PythonService) Stop(ctx context.Context) (novalike.Result, error) {
	p.stopOnce.Do(func() {
		defer p.cleanup()
		select {
		case <-p.done:
		default:
			_ = p.cmd.Process.Signal(syscall.SIGTERM)
		}
		select {
		case <-p.done:
		case <-ctx.Done():
			p.kill()
			p.stopErr = fmt.Errorf("%s (%s) did not exit after SIGTERM: %w\n%s", p.service, p.id, ctx.Err(), p.stderr.String())
			return
		}
		if p.waitErr != nil {
			p.stopErr = fmt.Errorf("%s (%s): %w\n%s", p.service, p.id, p.waitErr, p.stderr.String())
			return
		}
		p.res, p.stopErr = decodeResult(p.stdout.Bytes())
		if p.stopErr != nil {
			p.stopErr = fmt.Errorf("%s (%s): %w\n%s", p.service, p.id, p.stopErr, p.stderr.String())
		}
	})
	return p.res, p.stopErr
}

// failureMark starts each failure novalike.py logs (its FAILURE_MARK):
// the first few of them only.
const failureMark = "query failed: "

// failures are the failures the process logged, of failed in all.
func (p *PythonService) failures(failed int64) []error {
	if failed == 0 {
		return nil
	}
	var errs []error
	for _, line := range strings.Split(p.Log(), "\n") {
		if _, msg, ok := strings.Cut(line, failureMark); ok {
			errs = append(errs, fmt.Errorf("%s: %s", p.service, msg))
		}
	}
	if len(errs) == 0 {
		errs = append(errs, fmt.Errorf("%s (%s): %d queries failed, none in the log kept", p.service, p.id, failed))
	}
	return errs
}

func (p *PythonService) cleanup() { _ = os.RemoveAll(p.dir) }

func (p *PythonService) kill() {
	_ = p.cmd.Process.Kill()
	<-p.done
}

// decodeResult reads the one JSON line a novalike process prints on
// SIGTERM, with the Go service's keys and no others.
func decodeResult(out []byte) (novalike.Result, error) {
	var res novalike.Result
	lines := strings.Split(strings.TrimRight(string(out), "\n"), "\n")
	if len(lines) != 1 || lines[0] == "" {
		return res, fmt.Errorf("want one JSON line on stdout, got %q", out)
	}
	dec := json.NewDecoder(strings.NewReader(lines[0]))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&res); err != nil {
		return res, fmt.Errorf("result %q: %w", lines[0], err)
	}
	return res, nil
}

// PythonServices is a set of running novalike.py processes.
type PythonServices struct {
	List []*PythonService
	// Results are the processes' reports, set by Stop.
	Results []novalike.Result
}

// StartPythonServices starts n processes concurrently, each configured by
// configure(i). If any fails to start, those started are stopped and the
// errors returned.
func (e *Env) StartPythonServices(ctx context.Context, n int, configure func(i int) PythonConfig) (*PythonServices, error) {
	list := make([]*PythonService, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() { list[i], errs[i] = e.StartPython(ctx, configure(i)) })
	}
	wg.Wait()
	s := &PythonServices{}
	for _, p := range list {
		if p != nil {
			s.List = append(s.List, p)
		}
	}
	if err := errors.Join(errs...); err != nil {
		_, _ = s.Stop(context.WithoutCancel(ctx))
		return nil, err
	}
	return s, nil
}

// Stop stops every process concurrently (each bounded by ctx) and sums
// their reports. Stopping twice is harmless.
func (s *PythonServices) Stop(ctx context.Context) (Totals, error) {
	results := make([]novalike.Result, len(s.List))
	errs := make([]error, len(s.List))
	var wg sync.WaitGroup
	for i, p := range s.List {
		wg.Go(func() { results[i], errs[i] = p.Stop(ctx) })
	}
	wg.Wait()
	s.Results = results
	var t Totals
	for i, r := range results {
		t.Queries += r.Queries
		t.Failed += r.Failed
		t.Refused += r.Refused
		t.Failures = append(t.Failures, s.List[i].failures(r.Failed)...)
	}
	return t, errors.Join(errs...)
}

// IDs lists the processes' agent IDs.
func (s *PythonServices) IDs() []string {
	out := make([]string, len(s.List))
	for i, p := range s.List {
		out[i] = p.id
	}
	return out
}

// tailBuffer keeps the last tailSize bytes written to it; safe for
// concurrent use.
type tailBuffer struct {
	mu  sync.Mutex
	buf []byte
}

const tailSize = 16 << 10

func (b *tailBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.buf = append(b.buf, p...)
	if len(b.buf) > tailSize {
		b.buf = append(b.buf[:0], b.buf[len(b.buf)-tailSize:]...)
	}
	return len(p), nil
}

func (b *tailBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return string(b.buf)
}
