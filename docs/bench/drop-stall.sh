#!/bin/sh
# How long live reads stall behind the contract runner's DROP, with pgbench
# (docs/bench/dropstall), for the runner before the pg_locks look (BASE,
# default f4e5feb: lock_timeout 2s, backoff 100ms-5s) and for this tree
# (lock_timeout 50ms, look first), RUNS times each (default 3), in the two
# scenarios: "long" (a 7s transaction holds the table), "stream" (six
# sessions run BEGIN; SELECT; pg_sleep(5ms); COMMIT in a loop) and the same
# stream with pg_sleep(150ms), transactions three times the new
# lock_timeout.
# Needs PostgreSQL at PHASECAST_DATABASE_URL (default 127.0.0.1:5432, user
# postgres) and /usr/bin/pgbench. About 30 s a run.
#
#   docs/bench/drop-stall.sh [BASE] [RUNS]
set -eu
cd "$(dirname "$0")/../.."
base=${1:-f4e5feb}
runs=${2:-3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
git archive "$base" | tar -x -C "$tmp"
mkdir -p "$tmp/docs/bench"
cp -r docs/bench/dropstall "$tmp/docs/bench/"
(cd "$tmp" && go build -o "$tmp/dropstall-base" ./docs/bench/dropstall)
go build -o "$tmp/dropstall-new" ./docs/bench/dropstall
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "| runner | scenario | DDL phase | attempts | max read during DDL | p99 during | reads > 100 ms during | p50 during | max read outside DDL | p99 outside | reads |"
echo "|---|---|---|---|---|---|---|---|---|---|---|"
for scenario in "long" "stream" "stream --stream-hold 150ms"; do
	i=0
	while [ "$i" -lt "$runs" ]; do
		# shellcheck disable=SC2086 # the scenario's flags split on purpose
		"$tmp/dropstall-base" --scenario $scenario --label "$base: 2s, no look" 2>/dev/null
		# shellcheck disable=SC2086
		"$tmp/dropstall-new" --scenario $scenario --label "new: 50ms, look first" 2>/dev/null
		i=$((i + 1))
	done
done
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
