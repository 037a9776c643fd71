package cli

import (
	"errors"
	"fmt"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/phasecast/phasecast/schema"
)

func init() { extraCommands = append(extraCommands, newAgentsCmd) }

// newAgentsCmd is who may acknowledge: the principals allowed to enrol
// agents of each service, and forgetting an agent's row. Every change is
// audited (access_audit) with the actor.
func newAgentsCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "agents",
		Short: "Who may enrol agents (allow, deny, principals) and forgetting a ghost (forget)",
	}
	var actor string
	cmd.PersistentFlags().StringVar(&actor, "actor", defaultActor(), "who is changing it, for the audit log")

	principal := func(amqpUser, dbRole string) (kind, name string, err error) {
		switch {
		case (amqpUser == "") == (dbRole == ""):
			return "", "", errors.New("give exactly one of --amqp-user and --db-role")
		case amqpUser != "":
			return schema.PrincipalAMQP, amqpUser, nil
		default:
			return schema.PrincipalDB, dbRole, nil
		}
	}
	var amqpUser, dbRole string
	allow := &cobra.Command{
		Use:   "allow SERVICE",
		Short: "Let a broker user or a database role enrol agents of SERVICE ('*': every service)",
		Long: `Let a broker user (--amqp-user, the user_id RabbitMQ validates on each
status) or a database role (--db-role, the role that calls agent_sync)
enrol agents of SERVICE: create an agent's row, or take one over once its
lease is over. An enrolled agent's own statuses need no principal: they
carry its token. Audited.`,
		Args: cobra.ExactArgs(1),
		RunE: func(c *cobra.Command, args []string) error {
			kind, name, err := principal(amqpUser, dbRole)
			if err != nil {
				return err
			}
			return g.withStore(c.Context(), func(store *schema.Store) error {
				if err := store.AllowPrincipal(c.Context(), args[0], kind, name, actor); err != nil {
					return err
				}
				fmt.Fprintf(g.stdout, "%s:%s may enrol agents of %s\n", kind, name, args[0])
				return nil
			})
		},
	}
	deny := &cobra.Command{
		Use:   "deny SERVICE",
		Short: "Withdraw 'agents allow' (agents it enrolled keep their rows: forget them)",
		Args:  cobra.ExactArgs(1),
		RunE: func(c *cobra.Command, args []string) error {
			kind, name, err := principal(amqpUser, dbRole)
			if err != nil {
				return err
			}
			return g.withStore(c.Context(), func(store *schema.Store) error {
				found, err := store.DenyPrincipal(c.Context(), args[0], kind, name, actor)
				if err != nil {
					return err
				}
				if !found {
					return fmt.Errorf("%s:%s was not allowed for %s", kind, name, args[0])
				}
				fmt.Fprintf(g.stdout, "%s:%s may no longer enrol agents of %s\n", kind, name, args[0])
				return nil
			})
		},
	}
	for _, c := range []*cobra.Command{allow, deny} {
		c.Flags().StringVar(&amqpUser, "amqp-user", "", "a RabbitMQ user")
		c.Flags().StringVar(&dbRole, "db-role", "", "a PostgreSQL role")
	}
	list := &cobra.Command{
		Use:   "principals",
		Short: "List who may enrol agents, by service",
		Args:  cobra.NoArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			return g.withStore(c.Context(), func(store *schema.Store) error {
				ps, err := store.Principals(c.Context())
				if err != nil {
					return err
				}
				w := tabwriter.NewWriter(g.stdout, 0, 4, 2, ' ', 0)
				fmt.Fprintln(w, "SERVICE\tPRINCIPAL\tADDED BY\tAT")
				if len(ps) == 0 {
					fmt.Fprintln(w, "(none: no status can enrol an agent; see 'phasecast agents allow')")
				}
				for _, p := range ps {
					fmt.Fprintf(w, "%s\t%s\t%s\t%s\n", p.Service, p, p.AddedBy, p.AddedAt.Format("2006-01-02T15:04:05Z07:00"))
				}
				return w.Flush()
			})
		},
	}
	forget := &cobra.Command{
		Use:   "forget ID",
		Short: "Remove an agent's row and its conflicts (a ghost); audited",
		Long: `Remove agent ID's row and the conflicts recorded for it, so the
contract runner no longer waits for it. A live agent that is forgotten
enrols again with its next status if a principal allowed for its service
sends it. Audited, with who vouched for the row.`,
		Args: cobra.ExactArgs(1),
		RunE: func(c *cobra.Command, args []string) error {
			return g.withStore(c.Context(), func(store *schema.Store) error {
				found, err := store.ForgetAgent(c.Context(), args[0], actor)
				if err != nil {
					return err
				}
				if !found {
					return fmt.Errorf("no agent %q", args[0])
				}
				fmt.Fprintf(g.stdout, "forgot agent %s\n", args[0])
				return nil
			})
		},
	}
	cmd.AddCommand(allow, deny, list, forget)
	return cmd
}
