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
	// urlUserinfo matches the user info of every URL in free text: a
	// scheme, then everything up to an @ that no slash or space comes
	// before. A host:port followed by a path is not mistaken for it.
	urlUserinfo = regexp.MustCompile(`([A-Za-z][A-Za-z0-9+.-]*://)([^\s/@]*)@`)
)

const mask = "xxxxx"

// SplitURLs splits a comma-separated list of connection URLs (the nodes
// of a RabbitMQ cluster, as --amqp-url and PHASECAST_AMQP_URL take them),
// trimming spaces and dropping empty entries. A comma inside a URL's
// password must be percent-encoded (%2C).
func SplitURLs(list string) []string {
	var out []string
	for _, u := range strings.Split(list, ",") {
		if u = strings.TrimSpace(u); u != "" {
			out = append(out, u)
		}
	}
	return out
}

// Redact returns a connection string safe to log: the password of a URL
// (in its user info or a password= parameter), or the password= of a
// key/value string, becomes "xxxxx". A comma-separated list of URLs has
// every one of them redacted. It never returns a password, even for a URL
// that does not parse.
func Redact(conn string) string {
	if urls := SplitURLs(conn); len(urls) > 1 && strings.Contains(urls[1], "://") {
		for i, u := range urls {
			urls[i] = Redact(u)
		}
		return strings.Join(urls, ",")
	}
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
		// Whatever url.Parse took for a path or query may hold another
		// URL (a list with a missing comma): scrub that too.
		return scrubURLs(u.String())
	}
	conn = urlPassword.ReplaceAllString(conn, "${1}"+mask+"@")
	return keyValuePassword.ReplaceAllString(conn, "${1}"+mask)
}

// Scrub takes every password out of free text, such as a driver's or a
// broker's error message: the password in the user info of any URL it
// quotes, and any password=… pair.
func Scrub(text string) string {
	return keyValuePassword.ReplaceAllString(scrubURLs(text), "${1}"+mask)
}

// scrubURLs masks the password in the user info of every URL in text.
func scrubURLs(text string) string {
	return urlUserinfo.ReplaceAllStringFunc(text, func(m string) string {
		sub := urlUserinfo.FindStringSubmatch(m)
		user, _, hasPassword := strings.Cut(sub[2], ":")
		if !hasPassword {
			return m
		}
		return sub[1] + user + ":" + mask + "@"
	})
}

// RedactError returns err with every secret taken out of its text: the
// passwords of conns (connection strings or comma-separated lists of
// URLs) wherever they appear, and the user info of any URL it quotes.
// Use it wherever an AMQP or database error is logged or returned, since
// drivers and brokers may quote the connection string, or the part of it
// they choked on, in their own words. It returns err itself when its text
// holds no secret, so errors.Is and errors.As keep working in the common
// case.
func RedactError(err error, conns ...string) error {
	if err == nil {
		return nil
	}
	msg := err.Error()
	clean := msg
	for _, conn := range conns {
		clean = strings.ReplaceAll(clean, conn, Redact(conn))
	}
	clean = Scrub(urlPassword.ReplaceAllString(clean, "${1}"+mask+"@"))
	for _, conn := range conns {
		for _, part := range append(SplitURLs(conn), conn) {
			for _, s := range secrets(part) {
				clean = strings.ReplaceAll(clean, s, mask)
			}
		}
	}
	if clean == msg {
		return err
	}
	// Not wrapped: errors.As would hand the unscrubbed error back.
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
