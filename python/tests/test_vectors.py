"""Conformance: the Python decoders against testdata/protocol, the vectors
the Go decoders are tested against (docs/PROTOCOL.md)."""

import base64
import hashlib
import json
import os
import unittest

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from phasecast import wire

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VECTORS = os.environ.get("PHASECAST_PROTOCOL_VECTORS", os.path.join(REPO, "testdata", "protocol"))


def load(name):
    path = os.path.join(VECTORS, name)
    if not os.path.isfile(path):
        raise AssertionError(
            f"conformance vectors missing: {path} does not exist. They are written by the Go side "
            "(go test ./internal/wire -run TestProtocolVectors -update); without them the Python "
            "decoders are not checked against Go's")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def body_of(v):
    if "body_base64" in v:
        return base64.b64decode(v["body_base64"])
    if "body_repeat" in v:
        r = v["body_repeat"]
        prefix = r["prefix"].encode()
        fill = r["fill"].encode()
        body = prefix + fill * ((r["size"] - len(prefix)) // len(fill) + 1)
        return body[: r["size"]]
    return v["body"].encode("utf-8")


def decoded_state(st):
    return {"store_id": st.store_id, "epoch": st.epoch,
            "releases": [{"name": r.name, "phase": r.phase,
                          "removals": [{"table": rm.table, "columns": list(rm.columns)} for rm in r.removals]}
                         for r in st.releases],
            "sent_at": wire.format_time(st.sent_at)}


def decoded_status(st):
    d = {k: getattr(st, k) for k in ("store_id", "agent_id", "incarnation", "token", "service", "host", "pid",
                                      "version", "releases", "seq", "applied_epoch", "drained_epoch", "inflight",
                                      "app_name", "skip_grant", "leaving")}
    d["sent_at"] = wire.format_time(st.sent_at)
    return d


def decoded_grant(g):
    return {"agent_id": g.agent_id, "incarnation": g.incarnation, "seq": g.seq, "lease_ms": g.lease_ms,
            "epoch": g.epoch}


DECODERS = {"state": (wire.decode_state, decoded_state), "status": (wire.decode_status, decoded_status),
            "grant": (wire.decode_grant, decoded_grant)}


class VectorTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.keys = load("keys.json")
        seed = bytes.fromhex(cls.keys["state_seed_hex"])
        cls.signer = Ed25519PrivateKey.from_private_bytes(seed)
        cls.public = wire.load_public_key(base64.b64decode(cls.keys["state_public_base64"]))
        cls.mac_key = base64.b64decode(cls.keys["status_mac_key_base64"])

    def test_public_key_matches_seed(self):
        from cryptography.hazmat.primitives import serialization
        raw = self.signer.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.assertEqual(base64.b64encode(raw).decode(), self.keys["state_public_base64"])

    def check_kind(self, kind):
        doc = load(kind + ".json")
        decode, view = DECODERS[kind]
        self.assertGreater(len(doc["vectors"]), 5)
        valid = invalid = 0
        for v in doc["vectors"]:
            with self.subTest(kind=kind, name=v["name"]):
                body = body_of(v)
                if v["valid"]:
                    valid += 1
                    msg = decode(body)
                    if "decoded" in v:
                        got = view(msg)
                        for k, want in v["decoded"].items():
                            self.assertEqual(got.get(k), want, f"field {k}")
                    if kind == "state":
                        self.assertEqual(msg.digest(), v["digest"])
                    if "signature" in v:
                        wire.verify(self.public, body, v["signature"])
                        self.assertEqual(base64.b64encode(self.signer.sign(body)).decode(), v["signature"])
                    if "mac" in v:
                        self.assertEqual(wire.mac(self.mac_key, body), v["mac"])
                        wire.check_mac(self.mac_key, body, v["mac"])
                else:
                    invalid += 1
                    with self.assertRaises(wire.WireError) as cm:
                        decode(body)
                    self.assertEqual(cm.exception.reason, v["reason"], str(cm.exception))
        self.assertGreater(valid, 0)
        self.assertGreater(invalid, 0)

    def test_state_vectors(self):
        self.check_kind("state")

    def test_status_vectors(self):
        self.check_kind("status")

    def test_grant_vectors(self):
        self.check_kind("grant")

    def check_auth(self, vectors, check):
        self.assertTrue(vectors)
        for v in vectors:
            with self.subTest(name=v["name"]):
                body = v["body"].encode("utf-8")
                sig = v.get("signature", v.get("mac"))
                if v["verifies"]:
                    check(body, sig)
                else:
                    with self.assertRaises(wire.WireError) as cm:
                        check(body, sig)
                    self.assertEqual(cm.exception.reason, v["reason"])

    def test_state_signatures(self):
        self.check_auth(load("state.json")["signature_vectors"], lambda b, s: wire.verify(self.public, b, s))

    def test_grant_signatures(self):
        self.check_auth(load("grant.json")["signature_vectors"], lambda b, s: wire.verify(self.public, b, s))

    def test_status_macs(self):
        self.check_auth(load("status.json")["mac_vectors"], lambda b, s: wire.check_mac(self.mac_key, b, s))

    def test_tokens(self):
        doc = load("token.json")
        for v in doc["vectors"]:
            self.assertTrue(wire.valid_token(v["token"]))
            self.assertEqual(hashlib.sha256(bytes.fromhex(v["token"])).hexdigest(), v["sha256_hex"])
        for t in doc["invalid"]:
            self.assertFalse(wire.valid_token(t), t)

    def test_encoded_status_decodes(self):
        # What the agent sends is what Go's decoder takes back.
        st = wire.Status(agent_id="a-é", incarnation="00ff", token="ab" * 32, service="svc", host="h",
                         pid=1, releases=["L"], seq=7, applied_epoch=3, drained_epoch=2, inflight=1,
                         app_name="phasecast:a", store_id="s", sent_at=(1767322800, 5), skip_grant=True)
        back = wire.decode_status(wire.encode_status(st))
        self.assertEqual(back, st)


if __name__ == "__main__":
    unittest.main()
