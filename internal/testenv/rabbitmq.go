package testenv

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"net/url"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// EnvRabbitmqctl overrides the rabbitmqctl command, for a broker in a
// container: PHASECAST_RABBITMQCTL="docker compose exec -T rabbitmq rabbitmqctl".
const EnvRabbitmqctl = "PHASECAST_RABBITMQCTL"

// What docs/rabbitmq-permissions.md's commands are written for; tests
// substitute names of their own.
const (
	DocVhost       = "phasecast"
	DocBroadcaster = "phasecast-broadcaster"
	DocAgent       = "phasecast-agent"
	docPrefixRegex = `phasecast\.`
)

// Permissions is one set_permissions line of the permissions document.
type Permissions struct {
	Vhost, User, Configure, Write, Read string
}

// DocPermissions reads the set_permissions lines of the document at path
// (docs/rabbitmq-permissions.md), by user, and requires exactly one for
// each of DocBroadcaster and DocAgent: what the document tells operators
// is then what tests apply.
func DocPermissions(t testing.TB, path string) map[string]Permissions {
	t.Helper()
	f, err := os.Open(path)
	require.NoError(t, err)
	defer f.Close()
	perms := map[string]Permissions{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if !strings.HasPrefix(line, "rabbitmqctl set_permissions ") {
			continue
		}
		require.NotContains(t, line, `"`, "use single quotes in set_permissions lines: %s", line)
		args := shellWords(t, line)
		require.Len(t, args, 8, "want: rabbitmqctl set_permissions -p VHOST USER CONF WRITE READ, got: %s", line)
		require.Equal(t, "-p", args[2], line)
		p := Permissions{Vhost: args[3], User: args[4], Configure: args[5], Write: args[6], Read: args[7]}
		require.NotContains(t, perms, p.User, "two set_permissions lines for %s", p.User)
		perms[p.User] = p
	}
	require.NoError(t, sc.Err())
	require.Len(t, perms, 2, "want set_permissions lines for %s and %s", DocBroadcaster, DocAgent)
	require.Contains(t, perms, DocBroadcaster)
	require.Contains(t, perms, DocAgent)
	return perms
}

// shellWords splits a command line into words, with single quotes only:
// enough for the docs' commands.
func shellWords(t testing.TB, line string) []string {
	t.Helper()
	var words []string
	var word strings.Builder
	inWord, quoted := false, false
	for _, r := range line {
		switch {
		case r == '\'':
			quoted = !quoted
			inWord = true
		case (r == ' ' || r == '\t') && !quoted:
			if inWord {
				words = append(words, word.String())
				word.Reset()
				inWord = false
			}
		default:
			word.WriteRune(r)
			inWord = true
		}
	}
	require.False(t, quoted, "unbalanced quote: %s", line)
	if inWord {
		words = append(words, word.String())
	}
	return words
}

// RabbitmqctlCommand is the rabbitmqctl command line: EnvRabbitmqctl, or
// rabbitmqctl from PATH.
func RabbitmqctlCommand(t testing.TB) []string {
	t.Helper()
	if v := strings.Fields(os.Getenv(EnvRabbitmqctl)); len(v) > 0 {
		return v
	}
	path, err := exec.LookPath("rabbitmqctl")
	require.NoError(t, err, "this test manages the broker with rabbitmqctl: put it on PATH or set %s", EnvRabbitmqctl)
	return []string{path}
}

// Rabbitmqctl runs one rabbitmqctl command, bounded by timeout, and
// returns its output. secret, if not empty, is left out of the failure
// message.
func Rabbitmqctl(t testing.TB, timeout time.Duration, secret string, args ...string) string {
	t.Helper()
	argv := append(RabbitmqctlCommand(t), args...)
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	out, err := exec.CommandContext(ctx, argv[0], argv[1:]...).CombinedOutput()
	shown := strings.Join(argv, " ")
	if secret != "" {
		shown = strings.ReplaceAll(shown, secret, "xxxxx")
	}
	require.NoError(t, err, "%s:\n%s", shown, out)
	return string(out)
}

// LeastPrivilege is a vhost of the test's own with the permission
// document's two users in it, their permissions rewritten for Prefix. The
// vhost and the users are deleted when the test ends.
type LeastPrivilege struct {
	Vhost, Prefix      string
	Broadcaster, Agent string // the users' names
	passwords          map[string]string
	agentPerms         []string // the agent user's configure, write and read, for AddAgentUser
}

// NewLeastPrivilege creates the vhost and the users of the document at
// docPath with the permissions it lists.
func NewLeastPrivilege(t testing.TB, docPath string) *LeastPrivilege {
	t.Helper()
	perms := DocPermissions(t, docPath)
	AMQP(t) // a clear failure if the broker is down
	base := strings.ReplaceAll(Name("pct"), "_", "-")
	e := &LeastPrivilege{
		Vhost:       base,
		Prefix:      Name("pct"),
		Broadcaster: base + "-broadcaster",
		Agent:       base + "-agent",
		passwords:   map[string]string{},
	}
	users := map[string]string{DocBroadcaster: e.Broadcaster, DocAgent: e.Agent}
	const timeout = 30 * time.Second

	Rabbitmqctl(t, timeout, "", "add_vhost", e.Vhost)
	t.Cleanup(func() { Rabbitmqctl(t, timeout, "", "delete_vhost", e.Vhost) })
	for _, user := range users {
		pw := randomPassword(t)
		e.passwords[user] = pw
		Rabbitmqctl(t, timeout, pw, "add_user", user, pw)
		t.Cleanup(func() { Rabbitmqctl(t, timeout, "", "delete_user", user) })
	}
	prefixRegex := regexp.QuoteMeta(e.Prefix) + `\.`
	for docUser, p := range perms {
		require.Equal(t, DocVhost, p.Vhost)
		args := []string{"set_permissions", "-p", e.Vhost, users[docUser]}
		for _, re := range []string{p.Configure, p.Write, p.Read} {
			re = strings.ReplaceAll(re, docPrefixRegex, prefixRegex)
			require.NotContains(t, re, "phasecast", "a name in %s's permissions that is not the prefix", docUser)
			args = append(args, re)
		}
		Rabbitmqctl(t, timeout, "", args...)
		if docUser == DocAgent {
			e.agentPerms = args[4:]
		}
	}
	return e
}

// AddAgentUser adds another user with the agent's permissions, as one
// user per service would be (the user name ends in name), and returns it.
func (e *LeastPrivilege) AddAgentUser(t testing.TB, name string) string {
	t.Helper()
	const timeout = 30 * time.Second
	user := e.Vhost + "-" + name
	pw := randomPassword(t)
	e.passwords[user] = pw
	Rabbitmqctl(t, timeout, pw, "add_user", user, pw)
	t.Cleanup(func() { Rabbitmqctl(t, timeout, "", "delete_user", user) })
	Rabbitmqctl(t, timeout, "", append([]string{"set_permissions", "-p", e.Vhost, user}, e.agentPerms...)...)
	return user
}

// URL returns the test broker's URL for user (Broadcaster or Agent) in the
// vhost.
func (e *LeastPrivilege) URL(t testing.TB, user string) string {
	t.Helper()
	u, err := url.Parse(AMQPURL())
	require.NoError(t, err)
	u.User = url.UserPassword(user, e.passwords[user])
	u.Path = "/" + e.Vhost
	return u.String()
}

func randomPassword(t testing.TB) string {
	b := make([]byte, 16)
	_, err := rand.Read(b)
	require.NoError(t, err)
	return hex.EncodeToString(b)
}
