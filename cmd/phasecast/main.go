// Command phasecast coordinates the contract step of online schema
// migrations: see the README, or run 'phasecast --help'.
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"

	"github.com/phasecast/phasecast/cmd/phasecast/cli"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := cli.Main(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}
