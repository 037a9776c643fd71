package keys

import (
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/subtle"
	"encoding/base64"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
)

// File names WriteFiles uses, and the keys of the map it returns.
const (
	StateKeyFile  = "state.key"
	StatePubFile  = "state.pub"
	StatusMACFile = "status.mac"
)

// Environment variables that hold a key's base64 value directly, used when
// LoadOptions names no file.
const (
	EnvStateKey  = "PHASECAST_STATE_KEY"
	EnvStatePub  = "PHASECAST_STATE_PUB"
	EnvStatusMAC = "PHASECAST_STATUS_MAC"
)

// Accepted HMAC key lengths. Below MinMACSize the key is weaker than the
// SHA-256 output it protects (RFC 2104 §3); Generate uses MinMACSize.
const (
	MinMACSize = 32
	MaxMACSize = 1024
)

// Keys is the key material of one process. A nil field is not configured.
type Keys struct {
	// StatePrivate signs state and grant messages; only the broadcaster
	// holds it.
	StatePrivate ed25519.PrivateKey
	// StatePublic verifies state and grant messages.
	StatePublic ed25519.PublicKey
	// StatusMAC authenticates status messages.
	StatusMAC []byte
}

// String never shows key material, so a Keys that finds its way into a log
// line or a %v leaks nothing.
func (k Keys) String() string {
	return fmt.Sprintf("keys.Keys{state_private:%t state_public:%t status_mac:%t}",
		k.StatePrivate != nil, k.StatePublic != nil, k.StatusMAC != nil)
}

// GoString is String, for %#v.
func (k Keys) GoString() string { return k.String() }

// Generate returns a fresh Ed25519 key pair and a MinMACSize-byte HMAC key.
func Generate() (Keys, error) {
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return Keys{}, fmt.Errorf("generate state key: %w", err)
	}
	mac := make([]byte, MinMACSize)
	if _, err := rand.Read(mac); err != nil {
		return Keys{}, fmt.Errorf("generate status key: %w", err)
	}
	return Keys{StatePrivate: priv, StatePublic: pub, StatusMAC: mac}, nil
}

// ErrExists is returned by WriteFiles when a key file is already there.
var ErrExists = errors.New("key file already exists")

// WriteFiles writes each configured key of k into dir as base64 text, one
// line: state.key (the 32-byte private seed, mode 0600), state.pub (0644)
// and status.mac (0600). It returns the path of each file written, keyed by
// file name. It refuses to overwrite: if any of the files exists, nothing
// is written and the error wraps ErrExists. A failure part way removes the
// files written so far. dir is created (mode 0700) if it does not exist.
func WriteFiles(dir string, k Keys) (map[string]string, error) {
	if err := k.validate(); err != nil {
		return nil, err
	}
	type file struct {
		name string
		raw  []byte
		mode fs.FileMode
	}
	var files []file
	if k.StatePrivate != nil {
		files = append(files, file{StateKeyFile, k.StatePrivate.Seed(), 0o600})
	}
	if pub := k.public(); pub != nil {
		files = append(files, file{StatePubFile, pub, 0o644})
	}
	if k.StatusMAC != nil {
		files = append(files, file{StatusMACFile, k.StatusMAC, 0o600})
	}
	if len(files) == 0 {
		return nil, errors.New("write keys: no key is configured")
	}
	// A directory that is not there yet is made, private: it is about to
	// hold the private key.
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("write keys: %w", err)
	}
	for _, f := range files {
		path := filepath.Join(dir, f.name)
		if _, err := os.Lstat(path); err == nil {
			return nil, fmt.Errorf("write keys: %s: %w", path, ErrExists)
		} else if !errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("write keys: %w", err)
		}
	}
	paths := make(map[string]string, len(files))
	for _, f := range files {
		path := filepath.Join(dir, f.name)
		if err := writeNew(path, f.raw, f.mode); err != nil {
			for _, written := range paths {
				_ = os.Remove(written)
			}
			if errors.Is(err, fs.ErrExist) {
				err = fmt.Errorf("%s: %w", path, ErrExists)
			}
			return nil, fmt.Errorf("write keys: %w", err)
		}
		paths[f.name] = path
	}
	return paths, nil
}

// writeNew creates path, which must not exist, with exactly mode
// (whatever the umask) and writes raw to it as one line of base64.
func writeNew(path string, raw []byte, mode fs.FileMode) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
	if err != nil {
		return err
	}
	line := base64.StdEncoding.EncodeToString(raw) + "\n"
	_, err = f.WriteString(line)
	if err == nil {
		err = f.Chmod(mode)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		_ = os.Remove(path)
	}
	return err
}

// LoadOptions names where each key comes from. A file left empty falls back
// to the key's environment variable; a variable that is unset or empty
// leaves the key not configured.
type LoadOptions struct {
	// StateKeyFile holds the Ed25519 private key: its 32-byte seed or the
	// 64-byte seed-and-public form. Defaults to $PHASECAST_STATE_KEY.
	StateKeyFile string
	// StatePubFile holds the 32-byte Ed25519 public key. If only the
	// private key is configured, the public key is derived from it.
	// Defaults to $PHASECAST_STATE_PUB.
	StatePubFile string
	// StatusMACFile holds the HMAC-SHA256 key, MinMACSize to MaxMACSize
	// bytes. Defaults to $PHASECAST_STATUS_MAC.
	StatusMACFile string
}

// Load reads the keys opts names. A file that is named must exist and hold
// a key; an empty file is an error, not "not configured", so that a
// truncated secret cannot silently switch authentication off. Errors name
// the file or variable and never contain key material.
func Load(opts LoadOptions) (Keys, error) {
	var k Keys
	raw, src, err := read(opts.StateKeyFile, EnvStateKey)
	if err != nil {
		return Keys{}, err
	}
	if raw != nil {
		switch len(raw) {
		case ed25519.SeedSize:
			k.StatePrivate = ed25519.NewKeyFromSeed(raw)
		case ed25519.PrivateKeySize:
			priv := ed25519.PrivateKey(raw)
			// The second half is the public key; a value whose halves
			// disagree would sign with one key and claim another.
			derived := ed25519.NewKeyFromSeed(priv.Seed())
			if subtle.ConstantTimeCompare(derived, priv) != 1 {
				return Keys{}, fmt.Errorf("%s: not an Ed25519 private key: its public half does not match its seed", src)
			}
			k.StatePrivate = priv
		default:
			return Keys{}, fmt.Errorf("%s: Ed25519 private key is %d bytes, want %d (seed) or %d", src, len(raw), ed25519.SeedSize, ed25519.PrivateKeySize)
		}
	}

	raw, src, err = read(opts.StatePubFile, EnvStatePub)
	if err != nil {
		return Keys{}, err
	}
	if raw != nil {
		if len(raw) != ed25519.PublicKeySize {
			return Keys{}, fmt.Errorf("%s: Ed25519 public key is %d bytes, want %d", src, len(raw), ed25519.PublicKeySize)
		}
		k.StatePublic = ed25519.PublicKey(raw)
		if k.StatePrivate != nil && !bytes.Equal(k.StatePrivate.Public().(ed25519.PublicKey), k.StatePublic) {
			return Keys{}, fmt.Errorf("%s: public key does not belong to the private key (%s)", src, source(opts.StateKeyFile, EnvStateKey))
		}
	} else if k.StatePrivate != nil {
		k.StatePublic = k.StatePrivate.Public().(ed25519.PublicKey)
	}

	raw, src, err = read(opts.StatusMACFile, EnvStatusMAC)
	if err != nil {
		return Keys{}, err
	}
	if raw != nil {
		if len(raw) < MinMACSize || len(raw) > MaxMACSize {
			return Keys{}, fmt.Errorf("%s: HMAC key is %d bytes, want %d to %d", src, len(raw), MinMACSize, MaxMACSize)
		}
		k.StatusMAC = raw
	}
	return k, nil
}

// read returns the decoded value of file, or else of the environment
// variable env, and a description of where it came from for errors. A
// missing value is nil.
func read(file, env string) ([]byte, string, error) {
	src := source(file, env)
	var text string
	if file != "" {
		b, err := os.ReadFile(file)
		if err != nil {
			// *PathError names the file and the cause, never contents.
			return nil, src, fmt.Errorf("read key: %w", err)
		}
		text = string(bytes.TrimSpace(b))
		if text == "" {
			return nil, src, fmt.Errorf("%s: file is empty", src)
		}
	} else {
		text = string(bytes.TrimSpace([]byte(os.Getenv(env))))
		if text == "" {
			return nil, src, nil
		}
	}
	raw, err := decode(text)
	if err != nil {
		return nil, src, fmt.Errorf("%s: %w", src, err)
	}
	return raw, src, nil
}

// decode accepts standard base64 with or without padding. Its error says
// where the value is bad but not what it holds.
func decode(text string) ([]byte, error) {
	raw, err := base64.StdEncoding.DecodeString(text)
	if err != nil {
		var rawErr error
		raw, rawErr = base64.RawStdEncoding.DecodeString(text)
		if rawErr != nil {
			var at base64.CorruptInputError
			if errors.As(err, &at) {
				return nil, fmt.Errorf("not valid base64 (at byte %d)", int64(at))
			}
			return nil, errors.New("not valid base64")
		}
	}
	if len(raw) == 0 {
		return nil, errors.New("value decodes to nothing")
	}
	return raw, nil
}

func source(file, env string) string {
	if file != "" {
		return "key file " + file
	}
	return "environment variable " + env
}

// public is the configured public key, or the one the private key implies.
func (k Keys) public() ed25519.PublicKey {
	if k.StatePublic != nil {
		return k.StatePublic
	}
	if k.StatePrivate != nil {
		return k.StatePrivate.Public().(ed25519.PublicKey)
	}
	return nil
}

// validate checks the lengths and consistency of the keys WriteFiles is
// given, so it never writes a file Load would refuse.
func (k Keys) validate() error {
	if k.StatePrivate != nil && len(k.StatePrivate) != ed25519.PrivateKeySize {
		return fmt.Errorf("write keys: StatePrivate is %d bytes, want %d", len(k.StatePrivate), ed25519.PrivateKeySize)
	}
	if k.StatePublic != nil && len(k.StatePublic) != ed25519.PublicKeySize {
		return fmt.Errorf("write keys: StatePublic is %d bytes, want %d", len(k.StatePublic), ed25519.PublicKeySize)
	}
	if k.StatePrivate != nil && k.StatePublic != nil && !bytes.Equal(k.StatePrivate.Public().(ed25519.PublicKey), k.StatePublic) {
		return errors.New("write keys: StatePublic does not belong to StatePrivate")
	}
	if k.StatusMAC != nil && (len(k.StatusMAC) < MinMACSize || len(k.StatusMAC) > MaxMACSize) {
		return fmt.Errorf("write keys: StatusMAC is %d bytes, want %d to %d", len(k.StatusMAC), MinMACSize, MaxMACSize)
	}
	return nil
}
