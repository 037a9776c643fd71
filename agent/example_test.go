package agent_test

import (
	"context"
	"crypto/ed25519"
	"log"
	"net/url"
	"time"

	"github.com/jmoiron/sqlx"
	_ "github.com/lib/pq"

	"github.com/phasecast/phasecast/agent"
)

// A service embeds an agent: it opens its database with the agent's
// application_name, starts the agent before serving, and builds every
// query from a pinned snapshot.
func Example() {
	id := agent.NewID("nova-api")
	db := sqlx.MustOpen("postgres", "postgres://nova@db/nova?sslmode=disable&application_name="+
		url.QueryEscape(agent.DefaultApplicationName(id)))
	a, err := agent.New(agent.Config{
		Service: "nova-api", ID: id, Version: "27.1.0", Releases: []string{"L"},
		Tables: map[string][]string{"instances": {"id", "name", "display_name", "common_name"}},
		DB:     db.DB,
		// state.pub from 'phasecast keys generate': grants and states are
		// checked against it (Config.Insecure runs without, at a risk).
		StateKey: statePub,
	})
	if err != nil {
		log.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := a.Start(ctx); err != nil {
		log.Fatal(err)
	}
	defer a.Stop(context.Background())
	instances := a.Table("instances") // resolved once

	// For each request:
	g, err := a.Enter()
	if err != nil {
		return // agent.ErrStale: refuse the request (503) rather than risk a dropped column
	}
	defer g.Exit()
	rows, err := db.QueryxContext(ctx, "SELECT "+g.Snapshot().SelectList(instances)+" FROM instances")
	if err != nil {
		log.Print(err)
		return
	}
	defer rows.Close()
}

// statePub is the broadcaster's public key, as the service loads it.
var statePub ed25519.PublicKey
