# Medians of `go test -bench -count N` output, with ratios to the baselines:
#   go test -run "^$" -bench . -benchmem -count 5 ./agent/ | awk -f docs/bench/medians.awk
# Input: go test -bench output with -count N. Output: median ns/op per benchmark, allocs, and ratio to a baseline.
/^Benchmark/ {
	name=$1; sub(/-[0-9]+$/, "", name)
	for (i=1;i<=NF;i++) { if ($i=="ns/op") v=$(i-1); if ($i=="allocs/op") al[name]=$(i-1); if ($i=="B/op") by[name]=$(i-1) }
	n[name]++; vals[name, n[name]]=v
	if (!(name in seen)) { order[++k]=name; seen[name]=1 }
}
END {
	for (j=1;j<=k;j++) {
		nm=order[j]; m=n[nm]
		for (a=1;a<=m;a++) arr[a]=vals[nm,a]
		for (a=1;a<=m;a++) for (b=a+1;b<=m;b++) if (arr[b]+0<arr[a]+0) { t=arr[a]; arr[a]=arr[b]; arr[b]=t }
		med[nm] = (m%2) ? arr[(m+1)/2] : (arr[m/2]+arr[m/2+1])/2
		lo[nm]=arr[1]; hi[nm]=arr[m]
	}
	printf "%-34s %10s %10s %10s %8s %10s\n", "benchmark", "median", "min", "max", "B/op", "allocs/op"
	for (j=1;j<=k;j++) { nm=order[j]; printf "%-34s %10.3f %10.3f %10.3f %8s %10s\n", nm, med[nm], lo[nm], hi[nm], by[nm], al[nm] }
	print ""
	printf "ratios of medians: Snapshot/AtomicLoad %s, ColumnRemoved/SliceIndex %s, Columns/SliceIndex %s, ColumnsSelectList/SliceIndex %s, Removed/MapLookup %s, EnterExit/AtomicAddPair %s, EnterExitParallel/AtomicAddPairParallel %s, EnterExit/(AtomicAddPair+TickClock) %s\n", \
		r("BenchmarkSnapshot", "BenchmarkBaselineAtomicLoad"), r("BenchmarkColumnRemoved", "BenchmarkBaselineSliceIndex"), \
		r("BenchmarkColumns", "BenchmarkBaselineSliceIndex"), r("BenchmarkColumnsSelectList", "BenchmarkBaselineSliceIndex"), \
		r("BenchmarkRemoved", "BenchmarkBaselineMapLookup"), r("BenchmarkEnterExit", "BenchmarkBaselineAtomicAddPair"), \
		r("BenchmarkEnterExitParallel", "BenchmarkBaselineAtomicAddPairParallel"), \
		q(med["BenchmarkEnterExit"], med["BenchmarkTickClock"] > 0 ? med["BenchmarkBaselineAtomicAddPair"] + med["BenchmarkTickClock"] : 0)
}

function r(a, b) { return q(med[a], med[b]) }
function q(n, d) { return (n > 0 && d > 0) ? sprintf("%.2f", n / d) : "n/a" }
