"""phasecast: the agent that lets a Python service (an OpenStack service
under eventlet, say) take part in phasecast's expand → migrate → contract
protocol, as the Go agent does.

    from phasecast import Agent, Config, Stale
    agent = Agent(Config(service="nova-compute", releases=["L"], amqp_url=...,
                         state_pub_file="/etc/phasecast/state.pub",
                         tables={"instances": ["id", "name", "display_name"]}))
    agent.start()
    with agent.guard() as snap:      # raises Stale when the lease ran out
        cols = snap.columns("instances")
    agent.stop()

See phasecast.agent for the threads and the fork rule, and
phasecast.sqlalchemy for the SQLAlchemy integration.
"""

from .agent import (INSECURE_AGENT_WARNING, Agent, AgentError, Config, Stale, after_fork,
                    default_application_name, new_id)
from .snapshot import Snapshot

__all__ = ["Agent", "AgentError", "Config", "Snapshot", "Stale", "after_fork", "default_application_name",
           "new_id", "INSECURE_AGENT_WARNING"]
__version__ = "0.1.0"
