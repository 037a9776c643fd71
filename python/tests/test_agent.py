"""The Python agent against the real PostgreSQL, RabbitMQ and Go broadcaster."""

import base64
import json
import os
import select
import subprocess
import sys
import textwrap
import time
import unittest

import harness
from harness import AMQP_URL, PYROOT, PYTHON, Env, wait_for

from phasecast import Agent, AgentError, Config, Stale, wire


def publish_raw(prefix, body, headers=None, type_="state"):
    """Publish body on the state exchange as anyone who may write to it would."""
    import amqp
    from urllib.parse import urlsplit

    u = urlsplit(AMQP_URL)
    conn = amqp.Connection(f"{u.hostname}:{u.port or 5672}", userid=u.username, password=u.password)
    conn.connect()
    try:
        ch = conn.channel()
        ch.basic_publish(amqp.Message(body, type=type_, application_headers=headers or {}),
                         exchange=prefix + ".state", routing_key="")
    finally:
        conn.close()


class AgentTest(unittest.TestCase):
    def started(self, env, **kw):
        a = Agent(env.config(**kw))
        a.start(timeout=20)
        self.addCleanup(a.stop, 1.0)
        return a

    def test_start_flip_ack_recorded(self):
        env = Env(self)
        env.release()
        a = self.started(env)
        self.assertEqual(a.snapshot().epoch, env.epoch())
        self.assertEqual(a.application_name, "phasecast:" + a.id)
        table = env.app + ".instances"
        self.assertEqual(a.snapshot().columns(table), ("id", "name", "display_name", "common_name"))
        env.flip("L", "migrate")
        # Each flip is acked before the next, so that none is coalesced into
        # the next and acks_sent below counts one ack per state.
        migrate = env.epoch()
        env.wait_row(a.id, lambda r: r["drained_epoch"] == migrate, what="the ack of the migrate flip")
        env.flip("L", "contract")
        epoch = env.epoch()
        row = env.wait_row(a.id, lambda r: r["drained_epoch"] == epoch, what="the ack of the contract flip")
        self.assertEqual(row["incarnation"], a.incarnation)
        self.assertEqual(row["app_name"], a.application_name)
        self.assertEqual(row["vouched_by"], "amqp:guest", "user_id carried the broker user")
        self.assertTrue(row["live"])
        with a.guard() as snap:
            self.assertEqual(snap.epoch, epoch)
            self.assertTrue(snap.removed(table, "name"))
            self.assertFalse(snap.removed(table, "common_name"))
            self.assertEqual(snap.columns(table), ("id", "common_name"))
            self.assertEqual(snap.select_list(table), '"id", "common_name"')
            self.assertEqual(snap.phase("L"), "contract")
        st = a.stats()
        # One per flip; the first state's drain may ride on start's own status.
        self.assertGreaterEqual(st["acks_sent"], 2)
        self.assertEqual(st["drained_epoch"], epoch)
        self.assertEqual(st["unconfirmed_statuses"], 0)
        # The goodbye ends the lease in the store at once.
        self.assertTrue(a.stop(grace=2))
        row = env.agent_row(a.id)
        self.assertFalse(row["live"], "the goodbye ended the lease")
        with self.assertRaises(Stale):
            a.guard()

    def test_open_guard_delays_the_ack(self):
        env = Env(self)
        env.release()
        a = self.started(env)
        before = env.epoch()
        env.wait_row(a.id, lambda r: r["drained_epoch"] == before)
        g = a.guard()
        with g as pinned:
            env.flip("L", "migrate")
            epoch = env.epoch()
            wait_for(lambda: a.snapshot().epoch == epoch, what="the flip to reach the agent")
            time.sleep(1.0)  # heartbeats went out meanwhile
            row = env.agent_row(a.id)
            self.assertEqual(row["applied_epoch"], epoch)
            self.assertEqual(row["drained_epoch"], before, "no ack while a guard holds the old snapshot")
            self.assertEqual(pinned.epoch, before)
            self.assertEqual(a.stats()["inflight"], 1)
        env.wait_row(a.id, lambda r: r["drained_epoch"] == epoch, timeout=5, what="the ack once the guard exited")
        self.assertEqual(a.stats()["inflight"], 0)

    def test_lease_runs_out_without_broadcaster(self):
        env = Env(self, lease="3s")
        a = self.started(env)
        with a.guard():
            pass
        env.stop_broadcaster()
        t0 = time.monotonic()

        def stale():
            try:
                with a.guard():
                    return False
            except Stale:
                return True

        wait_for(stale, timeout=6, what="guard() to raise Stale after the lease ran out")
        self.assertLess(time.monotonic() - t0, 3.5, "fenced no later than the lease minus the margin")
        self.assertGreaterEqual(a.stats()["fencings"], 1)
        self.assertGreaterEqual(a.stats()["stale_refusals"], 1)
        env.start_broadcaster()
        wait_for(lambda: not stale(), timeout=15, what="a grant to lift the fence")

    def test_forged_states_are_rejected(self):
        env = Env(self)
        a = self.started(env)
        epoch = a.snapshot().epoch
        forged = json.dumps({"v": 1, "kind": "state", "store_id": a.stats()["store_id"], "epoch": epoch + 100,
                             "releases": []}).encode()
        publish_raw(env.prefix, forged)  # unsigned
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        other = Ed25519PrivateKey.generate()
        publish_raw(env.prefix, forged, {wire.SIGNATURE_HEADER: base64.b64encode(other.sign(forged)).decode()})
        publish_raw(env.prefix, b"not json", {wire.SIGNATURE_HEADER: "AAAA"})
        wait_for(lambda: sum(a.stats()["rejected"].values()) >= 3, what="the forged states to be counted")
        rej = a.stats()["rejected"]
        self.assertEqual(rej.get("unsigned"), 1, rej)
        self.assertEqual(rej.get("bad_signature"), 2, rej)
        time.sleep(0.3)
        self.assertEqual(a.snapshot().epoch, epoch, "no forged state applied")

    def test_reconnects_and_still_acks(self):
        env = Env(self)
        env.release()
        a = self.started(env)
        import socket
        # Drop the agent's TCP connection under it, as a lost node would.
        a._session.raw.transport.sock.shutdown(socket.SHUT_RDWR)
        wait_for(lambda: a.stats()["reconnects"] >= 1 and a.stats()["connected"], timeout=10,
                 what="the agent to reconnect")
        env.flip("L", "migrate")
        epoch = env.epoch()
        env.wait_row(a.id, lambda r: r["drained_epoch"] == epoch, what="the ack after the reconnect")

    def test_returned_status_drops_the_connection(self):
        env = Env(self)
        env.release()
        a = self.started(env)
        env.stop_broadcaster()  # so that nothing declares the queue again meanwhile
        import amqp
        from urllib.parse import urlsplit
        u = urlsplit(AMQP_URL)
        conn = amqp.Connection(f"{u.hostname}:{u.port or 5672}", userid=u.username, password=u.password)
        conn.connect()
        try:
            conn.channel().queue_delete(env.prefix + ".status")
        finally:
            conn.close()
        # The next status is returned (mandatory, no route): not sent, so
        # the agent drops its connection and dials again.
        wait_for(lambda: a.stats()["unconfirmed_statuses"] >= 1 and a.stats()["reconnects"] >= 1, timeout=10,
                 what="a returned status to count and reconnect")
        # The broadcaster declares the queue again; acks flow once more.
        env.start_broadcaster()
        env.flip("L", "migrate")
        epoch = env.epoch()
        env.wait_row(a.id, lambda r: r["drained_epoch"] == epoch, timeout=20, what="the ack after the queue came back")

    def test_wrong_status_mac_is_refused_by_the_broadcaster(self):
        env = Env(self)
        a = Agent(env.config(status_mac=b"not the broadcaster's key", status_mac_file=None))
        with self.assertRaises(AgentError):
            a.start(timeout=3)
        self.assertIsNone(env.agent_row(a.id), "no status with a bad MAC was recorded")
        self.assertGreaterEqual(a.stats()["statuses_sent"], 1)

    def test_with_database(self):
        env = Env(self, lease="3s")
        env.release()
        a = self.started(env, database_url=harness.DATABASE_URL, lease=3.0)
        env.flip("L", "migrate")
        epoch = env.epoch()
        env.wait_row(a.id, lambda r: r["drained_epoch"] == epoch)
        wait_for(lambda: a.stats()["digest_confirms"] >= 1, what="the flip confirmed by the store's digest")
        # A state the store does not vouch for changes nothing, even one
        # signed with the broadcaster's own key (a leaked key, a replay
        # from another store): it is confirmed against agent_digest() first.
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        key = Ed25519PrivateKey.from_private_bytes(wire.read_key_file(os.path.join(env.dir, "state.key"))[:32])
        forged = json.dumps({"v": 1, "kind": "state", "epoch": epoch + 100, "releases": []}).encode()
        publish_raw(env.prefix, forged, {wire.SIGNATURE_HEADER: base64.b64encode(key.sign(forged)).decode()})
        wait_for(lambda: a.stats()["rejected"].get("unconfirmed"), what="the forged state to be refused")
        self.assertEqual(a.snapshot().epoch, epoch)
        env.stop_broadcaster()
        # Without the broadcaster no grant comes; the lease runs out and is
        # renewed through agent_sync, so guard() keeps serving.
        resyncs = a.stats()["resyncs"]
        wait_for(lambda: a.stats()["resyncs"] > resyncs and a.stats()["fencings"] >= 1, timeout=8,
                 what="the lease renewed through the store")
        with a.guard() as snap:
            self.assertEqual(snap.epoch, epoch)
        # Acks reach the store without the broker... or the broadcaster.
        env.flip("L", "contract")
        epoch2 = env.epoch()
        wait_for(lambda: a.snapshot().epoch == epoch2, timeout=10, what="the flip read from the store")
        env.wait_row(a.id, lambda r: r["drained_epoch"] == epoch2, what="the ack through the store")

    def test_fork_gives_each_process_its_agent(self):
        env = Env(self)
        env.release()
        a = self.started(env)
        r, w = os.pipe()  # child -> parent: its identity
        r2, w2 = os.pipe()  # parent -> child: the epoch to ack
        pid = os.fork()
        if pid == 0:  # the child
            code = 1
            try:
                os.close(r)
                os.close(w2)
                try:
                    a.guard()
                    fenced = False
                except Stale:
                    fenced = True
                a.after_fork(timeout=20)
                os.write(w, (json.dumps({"id": a.id, "incarnation": a.incarnation, "fenced": fenced}) + "\n").encode())
                with os.fdopen(r2) as f:
                    want = int(f.readline())
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline and a.stats()["drained_epoch"] < want:
                    time.sleep(0.05)
                time.sleep(0.5)  # the ack's confirm
                a.stop(2)
                code = 0
            finally:
                os._exit(code)
        os.close(w)
        os.close(r2)
        with os.fdopen(r) as f:
            ready, _, _ = select.select([f], [], [], 30)
            self.assertTrue(ready, "the child's agent did not start")
            child = json.loads(f.readline())
        self.assertTrue(child["fenced"], "the inherited copy is fenced in the child")
        self.assertNotEqual(child["id"], a.id)
        self.assertNotEqual(child["incarnation"], a.incarnation)
        env.flip("L", "migrate")
        epoch = env.epoch()
        os.write(w2, f"{epoch}\n".encode())
        os.close(w2)
        env.wait_row(a.id, lambda r: r["drained_epoch"] == epoch, what="the parent's ack")
        env.wait_row(child["id"], lambda r: r["drained_epoch"] == epoch, what="the child's ack")
        _, status = os.waitpid(pid, 0)
        self.assertEqual(os.waitstatus_to_exitcode(status), 0)
        with a.guard() as snap:  # the parent's agent lives on
            self.assertEqual(snap.epoch, epoch)
        self.assertEqual(env.agent_row(a.id)["incarnation"], a.incarnation)

    def test_under_eventlet(self):
        env = Env(self)
        env.release()
        script = textwrap.dedent(f"""
            import eventlet
            eventlet.monkey_patch()
            import faulthandler, json, sys, time
            faulthandler.dump_traceback_later(40, exit=True)
            sys.path.insert(0, {PYROOT!r})
            from phasecast import Agent, Config
            cfg = Config(**json.loads(sys.argv[1]))
            a = Agent(cfg)
            t0 = time.monotonic()
            a.start(timeout=20)
            print("started in", time.monotonic() - t0, file=sys.stderr, flush=True)
            import threading
            assert eventlet.patcher.is_monkey_patched("thread")
            print(json.dumps({{"id": a.id, "epoch": a.snapshot().epoch}}), flush=True)
            want = int(sys.stdin.readline())
            deadline = time.monotonic() + 20
            while a.stats()["drained_epoch"] < want and time.monotonic() < deadline:
                with a.guard() as snap:
                    eventlet.sleep(0.01)
            print(json.dumps({{"drained": a.stats()["drained_epoch"]}}), flush=True)
            a.stop(2)
        """)
        cfg = dict(service="novalike", releases=["L"], amqp_url=AMQP_URL, schema=env.schema,
                   exchange_prefix=env.prefix, state_pub_file=env.state_pub, status_mac_file=env.status_mac,
                   heartbeat=0.5)
        err = open(os.path.join(env.dir, "child.err"), "w+")
        self.addCleanup(err.close)
        p = subprocess.Popen([PYTHON, "-c", script, json.dumps(cfg)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=err, text=True)
        child_err = lambda: (err.seek(0), err.read()[-3000:])[1]  # noqa: E731
        self.addCleanup(p.stdout.close)
        self.addCleanup(p.stdin.close)
        self.addCleanup(lambda: p.poll() is None and p.kill())
        ready, _, _ = select.select([p.stdout], [], [], 30)
        if not ready:
            p.kill()
        line = p.stdout.readline() if ready else ""
        self.assertTrue(line, "the eventlet child did not start: " + child_err())
        agent_id = json.loads(line)["id"]
        env.flip("L", "migrate")
        epoch = env.epoch()
        try:
            p.stdin.write(f"{epoch}\n")
            p.stdin.flush()
        except BrokenPipeError:
            self.fail("the eventlet child died: " + child_err())
        done = json.loads(p.stdout.readline() or "{}")
        self.assertEqual(done.get("drained"), epoch, child_err() if not done else "")
        env.wait_row(agent_id, lambda r: r["drained_epoch"] == epoch, what="the eventlet agent's ack")
        self.assertEqual(p.wait(15), 0)


class ConfigTest(unittest.TestCase):
    def test_refuses_without_state_key(self):
        with self.assertRaises(AgentError) as cm:
            Agent(Config(service="s"))
        self.assertIn("state_pub", str(cm.exception))
        Agent(Config(service="s", insecure=True))  # allowed, with a warning

    def test_validation_names_the_field(self):
        with self.assertRaises(AgentError) as cm:
            Agent(Config(service="", insecure=True, schema='bad"', tables={"t": []}))
        msg = str(cm.exception)
        for field in ("Config.service", "Config.schema", "Config.tables"):
            self.assertIn(field, msg)

    def test_no_password_in_errors(self):
        secret = "s3cr3t-pw"
        a = Agent(Config(service="s", insecure=True,
                         amqp_url=f"amqp://bob:{secret}@127.0.0.1:1/,amqp://eve:{secret}x@127.0.0.1:2/"))
        with self.assertLogs("phasecast", "WARNING") as logs:
            with self.assertRaises(AgentError) as cm:
                a.start(timeout=1.0)
        text = str(cm.exception) + "\n".join(logs.output)
        self.assertIn("127.0.0.1:1", text)
        self.assertNotIn(secret, text)
        with self.assertRaises(Stale):
            a.guard()

    def test_redact(self):
        from phasecast import redact
        self.assertEqual(redact.redact("amqp://u:p%40ss@h/,amqp://v:q@h2/"), "amqp://u:xxxxx@h/,amqp://v:xxxxx@h2/")
        self.assertEqual(redact.redact("host=h password=pw user=u"), "host=h password=xxxxx user=u")
        self.assertNotIn("p@ss", redact.scrub("login u/p@ss refused", ["amqp://u:p%40ss@h/"]))

    def test_ids(self):
        import phasecast
        i = phasecast.new_id("svc")
        self.assertTrue(i.startswith(f"svc-"))
        self.assertIn(f"-{os.getpid()}-", i)
        self.assertEqual(phasecast.default_application_name("x" * 100), ("phasecast:" + "x" * 100)[:63])
        self.assertEqual(len(phasecast.default_application_name("é" * 40).encode()), 62)


if __name__ == "__main__":
    unittest.main()
