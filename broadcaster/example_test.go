package broadcaster_test

import (
	"context"
	"os"
	"os/signal"
	"time"

	"github.com/rs/zerolog"

	"github.com/phasecast/phasecast/broadcaster"
	"github.com/phasecast/phasecast/internal/config"
	"github.com/phasecast/phasecast/schema"
)

// Run a broadcaster until interrupted. Start as many as you like against
// one store: one leads, the others stand by.
func Example() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	log := zerolog.New(os.Stderr).With().Timestamp().Logger()

	dbURL := config.Env(config.EnvDatabaseURL, config.DefaultDatabaseURL)
	store, err := schema.Open(ctx, dbURL, config.DefaultSchema)
	if err != nil {
		log.Fatal().Err(err).Msg("open the store")
	}
	defer store.Close()

	b, err := broadcaster.New(&broadcaster.Config{
		Store:       store,
		DatabaseURL: dbURL,
		AMQPURL:     config.Env(config.EnvAMQPURL, config.DefaultAMQPURL),
		Logger:      log,
	})
	if err != nil {
		log.Fatal().Err(err).Msg("configure the broadcaster")
	}
	if err := b.Start(ctx); err != nil {
		log.Fatal().Err(err).Msg("start the broadcaster")
	}
	<-ctx.Done()

	stopCtx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := b.Stop(stopCtx); err != nil {
		log.Error().Err(err).Msg("stop the broadcaster")
	}
}
