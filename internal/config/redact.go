package config

import (
	"errors"
	"net/url"
	"regexp"
	"strings"
)

var (
	// keyValuePassword matches password=… in a libpq key/value string.
	keyValuePassword = regexp.MustCompile(`(?i)(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)`)
	// urlPassword matches the password of a URL, even one url.Parse refuses.
	urlPassword = regexp.MustCompile(`(://[^/@:]*:)[^@]*@`)
)

const mask = "xxxxx"

// Redact returns a connection string safe to log: the password of a URL
// (in its user info or a password= parameter), or the password= of a
// key/value string, becomes "xxxxx". It never returns a password, even for
// a URL that does not parse.
func Redact(conn string) string {
	u, err := url.Parse(conn)
	if err == nil && u.Scheme != "" && u.Host != "" {
		if _, has := u.User.Password(); has {
			u.User = url.UserPassword(u.User.Username(), mask)
		}
		q := u.Query()
		if q.Has("password") {
			q.Set("password", mask)
			u.RawQuery = q.Encode()
		}
		return u.String()
	}
	conn = urlPassword.ReplaceAllString(conn, "${1}"+mask+"@")
	return keyValuePassword.ReplaceAllString(conn, "${1}"+mask)
}

// RedactError returns err with every secret of conn taken out of its text,
// for drivers whose errors quote the connection string or the part of it
// they choked on. It returns err itself when its text holds no secret, so
// errors.Is and errors.As keep working in the common case.
func RedactError(err error, conn string) error {
	if err == nil {
		return nil
	}
	msg := err.Error()
	clean := strings.ReplaceAll(msg, conn, Redact(conn))
	clean = urlPassword.ReplaceAllString(clean, "${1}"+mask+"@")
	for _, s := range secrets(conn) {
		clean = strings.ReplaceAll(clean, s, mask)
	}
	if clean == msg {
		return err
	}
	return errors.New(clean)
}

// secrets lists the passwords a connection string carries.
func secrets(conn string) []string {
	var out []string
	if m := urlPassword.FindStringSubmatch(conn); m != nil {
		out = append(out, strings.TrimSuffix(strings.TrimPrefix(m[0], m[1]), "@"))
	}
	if u, err := url.Parse(conn); err == nil {
		if p := u.Query().Get("password"); p != "" {
			out = append(out, p)
		}
		if p, ok := u.User.Password(); ok && p != "" {
			out = append(out, p, url.QueryEscape(p))
		}
	}
	for _, m := range keyValuePassword.FindAllStringSubmatch(conn, -1) {
		out = append(out, m[2], strings.Trim(m[2], "'"))
	}
	kept := out[:0]
	for _, s := range out {
		if s != "" && s != mask {
			kept = append(kept, s)
		}
	}
	return kept
}

// Secrets lists the passwords conn carries, to take out of text that may
// quote them (a child process's output) where Redact cannot be applied.
func Secrets(conn string) []string { return secrets(conn) }
