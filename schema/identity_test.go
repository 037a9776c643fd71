package schema_test

import (
	"context"
	"regexp"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/phasecast/phasecast/internal/phase"
	"github.com/phasecast/phasecast/internal/testenv"
	"github.com/phasecast/phasecast/internal/wire"
	"github.com/phasecast/phasecast/schema"
)

var uuidLike = regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$`)

// TestStoreIdentity: migrate creates the store's identity once; nothing
// changes it, every read of the state carries it, and a store dropped and
// migrated again under the same name is another store.
func TestStoreIdentity(t *testing.T) {
	ctx := context.Background()
	idOf := func(t *testing.T, store *schema.Store) string {
		t.Helper()
		id, err := store.ID(ctx)
		require.NoError(t, err)
		return id
	}

	t.Run("created once by migrate, carried by every state read", func(t *testing.T) {
		store, b := setupStore(t)
		id := idOf(t, store)
		require.Regexp(t, uuidLike, id)
		_, err := store.Migrate(ctx)
		require.NoError(t, err)
		require.Equal(t, id, idOf(t, store), "a re-run of migrate keeps the identity")

		_, err = store.ApplyRelease(ctx, b.manifest(t, "L"), "tester")
		require.NoError(t, err)
		_, err = store.Flip(ctx, "L", phase.Migrate, schema.FlipOptions{})
		require.NoError(t, err)
		st, err := store.State(ctx)
		require.NoError(t, err)
		require.Equal(t, id, st.StoreID)
		requireSealed(t, store) // the digest, which leaves the id out, still matches
		synced, err := store.SyncAgent(ctx, testenv.Credentials(wire.Status{AgentID: "a-1", Service: "s", Seq: 1, StoreID: id, SentAt: time.Now()}), time.Second)
		require.NoError(t, err)
		require.Equal(t, id, synced.StoreID)
		require.Equal(t, st.Digest(), synced.Digest())
	})

	t.Run("two stores, or one dropped and migrated again, differ", func(t *testing.T) {
		db := testenv.DB(t)
		name := testenv.Name("pct")
		store, err := schema.NewStore(db, name)
		require.NoError(t, err)
		t.Cleanup(func() { testenv.DropSchema(t, db, name) })
		_, err = store.Migrate(ctx)
		require.NoError(t, err)
		first := idOf(t, store)

		testenv.DropSchema(t, db, name)
		_, err = store.Migrate(ctx)
		require.NoError(t, err)
		second := idOf(t, store)
		require.NotEqual(t, first, second, "a freshly migrated store is another store")
		require.NotEqual(t, second, idOf(t, testenv.Store(t)))
	})

	t.Run("a store from before the identity says to migrate", func(t *testing.T) {
		store, _ := setupStore(t)
		q := `"` + store.Schema() + `"`
		_, err := store.DB().Exec(`DROP TABLE ` + q + `.store_identity; DELETE FROM ` + q + `.schema_migrations WHERE version = 3`)
		require.NoError(t, err)
		_, err = store.ID(ctx)
		require.ErrorIs(t, err, schema.ErrNotMigrated)
		_, err = store.State(ctx)
		require.ErrorIs(t, err, schema.ErrNotMigrated)

		res, err := store.Migrate(ctx)
		require.NoError(t, err)
		require.Equal(t, []int{3}, res.Applied)
		require.Regexp(t, uuidLike, idOf(t, store))
		requireSealed(t, store)
	})
}
