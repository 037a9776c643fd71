package schema_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/phasecast/phasecast/internal/testenv"
	"github.com/phasecast/phasecast/internal/wire"
	"github.com/phasecast/phasecast/schema"
)

// BenchmarkRecordStatus is the broadcaster's record path: batches of
// heartbeats from 100 enrolled agents, each with its token and broker
// principal, as one record_agents call per batch. It measures what the
// per-agent identity costs per status (the token's hash and compare, the
// principal check on enrolment) against the same loop on a store without
// it (BENCHMARKS.md, "What authentication costs"):
//
//	go test -run '^$' -bench BenchmarkRecordStatus -benchtime 2000x ./schema/
func BenchmarkRecordStatus(b *testing.B) {
	const agents = 100
	for _, batch := range []int{1, 100} {
		b.Run(fmt.Sprintf("batch=%d", batch), func(b *testing.B) {
			ctx := context.Background()
			store := testenv.Store(b)
			statuses := make([]wire.Status, agents)
			for i := range statuses {
				statuses[i] = testenv.Credentials(wire.Status{V: wire.StatusVersion, Kind: wire.KindStatus,
					AgentID: fmt.Sprintf("bench-%03d", i), Service: "bench", Host: "h", PID: i, Releases: []string{"L"},
					Seq: 1, SentAt: time.Now()})
			}
			sent := make([]schema.Sent, batch)
			b.ResetTimer()
			for n := 0; n < b.N; n++ {
				for j := range sent {
					i := (n*batch + j) % agents
					statuses[i].Seq++
					sent[j] = schema.Sent{Status: statuses[i], Principal: "amqp:guest"}
				}
				if _, err := store.RecordSent(ctx, sent, 10*time.Second, false); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(b.Elapsed().Microseconds())/float64(b.N*batch), "µs/status")
		})
	}
}
