"""The phasecast wire protocol: state, status and grant messages.

This is the Python twin of the Go package internal/wire. The decoders give
the verdict Go's decoders give on the same bytes (testdata/protocol holds
the vectors both sides are tested against): Go's encoding/json rules are
followed where they differ from Python's json module (integers only as
integer literals and within their Go type, keys matched exactly or else
case-insensitively, the last duplicate winning, null leaving a field
empty, invalid UTF-8 in a string read as U+FFFD, no NaN), and a body that
fails to decode is read again for its header alone to say whether it is
of another version or kind rather than malformed.
"""

from __future__ import annotations

import base64
import binascii
import calendar
import hashlib
import hmac
import json
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

VERSION = 1  # states and grants
STATUS_VERSION = 2  # statuses (they carry the agent's token)
TOKEN_SIZE = 32  # bytes; Status.token is its lower-case hex
MAX_MESSAGE_SIZE = 1 << 20
MAX_INCARNATION = 64
MAX_AGENT_ID = 200

KIND_STATE = "state"
KIND_STATUS = "status"
KIND_GRANT = "grant"

SIGNATURE_HEADER = "phasecast-signature"  # Ed25519, on state and grant
MAC_HEADER = "phasecast-mac"  # HMAC-SHA256, on status

REASON_TOO_LARGE = "too_large"
REASON_MALFORMED = "malformed"
REASON_VERSION = "version"
REASON_KIND = "kind"
REASON_INVALID = "invalid"
REASON_UNSIGNED = "unsigned"
REASON_BAD_SIGNATURE = "bad_signature"

PHASES = ("expand", "migrate", "contract", "contracting", "complete")
HIDING_PHASES = frozenset(("contract", "contracting", "complete"))

_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
_UINT64_MAX = (1 << 64) - 1
_INT32_MIN, _INT32_MAX = -(1 << 31), (1 << 31) - 1
_MAX_LEASE_MS = _INT64_MAX // 1_000_000  # time.Duration would overflow


class WireError(ValueError):
    """A message refused by a decoder or an authentication check.

    reason is one of the REASON_* constants, as Go's wire.Reason names it.
    """

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


# ---------------------------------------------------------------- messages


@dataclass(frozen=True)
class Removal:
    table: str
    columns: Tuple[str, ...] = ()


@dataclass(frozen=True)
class Release:
    name: str
    phase: str
    removals: Tuple[Removal, ...] = ()


@dataclass(frozen=True)
class State:
    epoch: int
    releases: Tuple[Release, ...] = ()
    store_id: str = ""
    sent_at: Optional[Tuple[int, int]] = None  # (unix seconds, nanoseconds) UTC

    def digest(self) -> str:
        """The digest Go's wire.State.Digest computes: SHA-256 over the
        epoch and every release's name, phase and removals, each field
        length-prefixed with a uvarint. store_id and sent_at are left out."""
        h = hashlib.sha256()
        put_int = lambda n: h.update(_uvarint(n))  # noqa: E731

        def put_str(s: str) -> None:
            b = s.encode("utf-8")
            put_int(len(b))
            h.update(b)

        put_int(self.epoch & _UINT64_MAX)
        put_int(len(self.releases))
        for r in self.releases:
            put_str(r.name)
            put_str(r.phase)
            put_int(len(r.removals))
            for rm in r.removals:
                put_str(rm.table)
                put_int(len(rm.columns))
                for c in rm.columns:
                    put_str(c)
        return h.hexdigest()


@dataclass(frozen=True)
class Grant:
    agent_id: str
    seq: int
    lease_ms: int
    epoch: int
    incarnation: str = ""


@dataclass
class Status:
    agent_id: str
    incarnation: str
    token: str
    service: str = ""
    host: str = ""
    pid: int = 0
    version: str = ""
    releases: List[str] = field(default_factory=list)
    seq: int = 0
    applied_epoch: int = 0
    drained_epoch: int = 0
    inflight: int = 0
    app_name: str = ""
    store_id: str = ""
    sent_at: Optional[Tuple[int, int]] = None
    skip_grant: bool = False
    leaving: bool = False

    def to_wire(self, with_token: bool = True) -> Dict[str, Any]:
        """The status as Go's wire.EncodeStatus lays it out (omitempty on
        store_id, incarnation, token, app_name, skip_grant, leaving)."""
        d: Dict[str, Any] = {"v": STATUS_VERSION, "kind": KIND_STATUS}
        if self.store_id:
            d["store_id"] = self.store_id
        d["agent_id"] = self.agent_id
        if self.incarnation:
            d["incarnation"] = self.incarnation
        if self.token and with_token:
            d["token"] = self.token
        d.update(service=self.service, host=self.host, pid=self.pid, version=self.version,
                 releases=list(self.releases), seq=self.seq, applied_epoch=self.applied_epoch,
                 drained_epoch=self.drained_epoch, inflight=self.inflight)
        if self.app_name:
            d["app_name"] = self.app_name
        d["sent_at"] = format_time(self.sent_at)
        if self.skip_grant:
            d["skip_grant"] = True
        if self.leaving:
            d["leaving"] = True
        return d


def encode_status(st: Status) -> bytes:
    """The exact bytes of a status message."""
    return json.dumps(st.to_wire(), separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _uvarint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


# ------------------------------------------------------------------ times

_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?(Z|([+-])(\d{2}):(\d{2}))\Z")


def parse_time(text: str) -> Tuple[int, int]:
    """Parse an RFC 3339 time as Go's time.Time.UnmarshalJSON does, to
    (unix seconds, nanoseconds)."""
    m = _RFC3339.match(text)
    if not m:
        raise ValueError("not an RFC 3339 time")
    year, month, day, hour, minute, sec = (int(m.group(i)) for i in range(1, 7))
    if not (1 <= month <= 12) or hour > 23 or minute > 59 or sec > 59:
        raise ValueError("time field out of range")
    mdays = calendar.monthrange(year, month)[1] if year > 0 else (29 if month == 2 else calendar.monthrange(2000, month)[1])
    if not (1 <= day <= mdays):
        raise ValueError("day out of range")
    frac = m.group(7) or ""
    nanos = int((frac + "000000000")[:9]) if frac else 0
    offset = 0
    if m.group(8) != "Z":
        oh, om = int(m.group(10)), int(m.group(11))
        if oh > 23 or om > 59:
            raise ValueError("time zone offset out of range")
        offset = (oh * 3600 + om * 60) * (1 if m.group(9) == "+" else -1)
    days = _days_from_civil(year, month, day)
    return days * 86400 + hour * 3600 + minute * 60 + sec - offset, nanos


def _days_from_civil(y: int, m: int, d: int) -> int:
    y -= m <= 2
    era = (y if y >= 0 else y - 399) // 400
    yoe = y - era * 400
    doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def format_time(t: Optional[Tuple[int, int]]) -> Optional[str]:
    """RFC 3339 with nanoseconds in UTC, trailing zeros trimmed, as Go's
    time.Time.MarshalJSON writes a UTC time; None for no time."""
    if t is None:
        return None
    secs, nanos = t
    days, rem = divmod(secs, 86400)
    y, mo, d = _civil_from_days(days)
    s = "%04d-%02d-%02dT%02d:%02d:%02d" % (y, mo, d, rem // 3600, rem % 3600 // 60, rem % 60)
    if nanos:
        s += ("." + "%09d" % nanos).rstrip("0")
    return s + "Z"


def _civil_from_days(z: int) -> Tuple[int, int, int]:
    z += 719468
    era = (z if z >= 0 else z - 146096) // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    y = yoe + era * 400
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    d = doy - (153 * mp + 2) // 5 + 1
    m = mp + (3 if mp < 10 else -9)
    return y + (m <= 2), m, d


# ------------------------------------------- Go's encoding/json, in Python


class _Float(str):
    """A JSON number written with a fraction or an exponent."""


class _Obj(list):
    """A JSON object as its (key, value) pairs, in order, duplicates kept."""


class _TypeError(Exception):
    """A value of the wrong type for its field (Go: *json.UnmarshalTypeError)."""


def _no_constant(name: str) -> Any:
    raise ValueError(f"invalid JSON value {name}")


def _parse_json(body: bytes) -> Any:
    text = body.decode("utf-8", "replace")
    return json.loads(text, object_pairs_hook=_Obj, parse_float=_Float, parse_constant=_no_constant)


_SURROGATE = re.compile("[\ud800-\udfff]")


def _go_str(v: str) -> str:
    # Python keeps a lone \uD800 escape as a surrogate; Go reads U+FFFD.
    return _SURROGATE.sub("\ufffd", v) if _SURROGATE.search(v) else v


# A field spec is one of: "str", "bool", ("int", lo, hi), "time", ["str"]
# (a list of strings), [struct] (a list of structs), or a struct: a dict
# of field name -> spec. decode() fills a dict and records type errors the
# way Go does: it keeps going and remembers that one happened.

_INT64 = ("int", _INT64_MIN, _INT64_MAX)
_UINT64 = ("int", 0, _UINT64_MAX)

_REMOVAL = {"table": "str", "columns": ["str"]}
_RELEASE = {"name": "str", "phase": "str", "removals": [_REMOVAL]}
_STATE = {"v": _INT64, "kind": "str", "store_id": "str", "epoch": _INT64,
          "releases": [_RELEASE], "sent_at": "time"}
_STATUS = {"v": _INT64, "kind": "str", "store_id": "str", "agent_id": "str", "incarnation": "str",
           "token": "str", "service": "str", "host": "str", "pid": _INT64, "version": "str",
           "releases": ["str"], "seq": _UINT64, "applied_epoch": _INT64, "drained_epoch": _INT64,
           "inflight": _INT64, "app_name": "str", "sent_at": "time", "skip_grant": "bool",
           "leaving": "bool"}
_GRANT = {"v": _INT64, "kind": "str", "agent_id": "str", "incarnation": "str", "seq": _UINT64,
          "lease_ms": _INT64, "epoch": _INT64}
_HEADER = {"v": _INT64, "kind": "str"}


class _Decoder:
    def __init__(self) -> None:
        self.failed = False

    def struct(self, spec: Dict[str, Any], value: Any, into: Dict[str, Any]) -> None:
        if value is None:
            return
        if not isinstance(value, _Obj):
            self.failed = True
            return
        for key, v in value:
            name = key if key in spec else _fold(key, spec)
            if name is not None:
                self.value(spec[name], v, into, name)

    def value(self, spec: Any, v: Any, into: Dict[str, Any], name: str) -> None:
        if v is None:
            if isinstance(spec, list):
                into[name] = None
            return
        if spec == "str":
            if isinstance(v, str) and not isinstance(v, _Float):
                into[name] = _go_str(v)
            else:
                self.failed = True
        elif spec == "bool":
            if isinstance(v, bool):
                into[name] = v
            else:
                self.failed = True
        elif spec == "time":
            if isinstance(v, str) and not isinstance(v, _Float):
                try:
                    into[name] = parse_time(v)
                except ValueError:
                    self.failed = True
            else:
                self.failed = True
        elif isinstance(spec, tuple):
            if type(v) is int and spec[1] <= v <= spec[2]:
                into[name] = v
            else:
                self.failed = True
        elif isinstance(spec, list):
            if not isinstance(v, list) or isinstance(v, _Obj):
                self.failed = True
                return
            elem = spec[0]
            out: List[Any] = []
            for item in v:
                if isinstance(elem, dict):
                    d: Dict[str, Any] = {}
                    self.struct(elem, item, d)
                    out.append(d)
                else:
                    holder: Dict[str, Any] = {}
                    self.value(elem, item, holder, "x")
                    out.append(holder.get("x", ""))
            into[name] = out
        else:  # a struct field
            d = into.get(name) or {}
            self.struct(spec, v, d)
            into[name] = d


def _fold(key: str, spec: Dict[str, Any]) -> Optional[str]:
    # Go matches a key to a field case-insensitively when no field has the
    # exact name (with the Kelvin sign and the long s folded too).
    k = key.lower().replace("\u017f", "s")
    for name in spec:
        if name == k:
            return name
    return None


def check_size(body: bytes) -> None:
    if len(body) > MAX_MESSAGE_SIZE:
        raise WireError(REASON_TOO_LARGE, f"{len(body)} bytes (limit {MAX_MESSAGE_SIZE})")


def _version_of(kind: str) -> int:
    return STATUS_VERSION if kind == KIND_STATUS else VERSION


def _check_header(h: Dict[str, Any], kind: str) -> None:
    v, k = h.get("v", 0), h.get("kind", "")
    if k != kind:
        if v != VERSION and v != STATUS_VERSION:
            raise WireError(REASON_VERSION, f"v={v} (this build speaks v={_version_of(kind)})")
        raise WireError(REASON_KIND, f"got {k!r}, want {kind!r}")
    if v != _version_of(kind):
        raise WireError(REASON_VERSION, f"{kind} v={v} (this build speaks v={_version_of(kind)})")


def _decode(body: bytes, kind: str, spec: Dict[str, Any]) -> Dict[str, Any]:
    check_size(body)
    try:
        doc = _parse_json(body)
    except (ValueError, RecursionError) as e:
        raise WireError(REASON_MALFORMED, f"not JSON: {e}") from None
    dec = _Decoder()
    out: Dict[str, Any] = {}
    dec.struct(spec, doc, out)
    if not dec.failed:
        _check_header(out, kind)
        return out
    hdec = _Decoder()
    h: Dict[str, Any] = {}
    hdec.struct(_HEADER, doc, h)
    if hdec.failed:
        raise WireError(REASON_MALFORMED, "the header has a field of the wrong type")
    _check_header(h, kind)
    raise WireError(REASON_MALFORMED, "a field of the wrong type")


def decode_state(body: bytes) -> State:
    """Decode and validate a state message, or raise WireError."""
    d = _decode(body, KIND_STATE, _STATE)
    return state_from_dict(d)


def state_from_dict(d: Dict[str, Any]) -> State:
    """Validate a decoded state (a message, or what agent_state() returned)."""
    epoch = d.get("epoch", 0)
    if epoch < 0:
        raise WireError(REASON_INVALID, f"negative epoch {epoch}")
    releases = []
    seen = set()
    for r in d.get("releases") or ():
        name, ph = r.get("name", ""), r.get("phase", "")
        if name == "":
            raise WireError(REASON_INVALID, "release with no name")
        if name in seen:
            raise WireError(REASON_INVALID, f"release {name!r} listed twice")
        seen.add(name)
        if ph not in PHASES:
            raise WireError(REASON_INVALID, f"release {name!r} has unknown phase {ph!r}")
        removals = []
        for rm in r.get("removals") or ():
            if rm.get("table", "") == "":
                raise WireError(REASON_INVALID, f"release {name!r} has a removal with no table")
            removals.append(Removal(rm["table"], tuple(rm.get("columns") or ())))
        releases.append(Release(name, ph, tuple(removals)))
    return State(epoch=epoch, releases=tuple(releases), store_id=d.get("store_id", "") or "",
                 sent_at=d.get("sent_at"))


def valid_token(token: str) -> bool:
    return len(token) == 2 * TOKEN_SIZE and all(c in "0123456789abcdef" for c in token)


def decode_status(body: bytes) -> Status:
    """Decode and validate a status message, or raise WireError."""
    d = _decode(body, KIND_STATUS, _STATUS)
    g = d.get
    agent_id, inc, token = g("agent_id", ""), g("incarnation", ""), g("token", "")
    applied, drained = g("applied_epoch", 0), g("drained_epoch", 0)
    problem = None
    if agent_id == "":
        problem = "status with no agent_id"
    elif len(agent_id.encode()) > MAX_AGENT_ID:
        problem = f"agent_id longer than {MAX_AGENT_ID} bytes"
    elif inc == "":
        problem = "status with no incarnation"
    elif len(inc.encode()) > MAX_INCARNATION:
        problem = f"incarnation longer than {MAX_INCARNATION} bytes"
    elif not valid_token(token):
        problem = f"status without a token of {TOKEN_SIZE} bytes in lower-case hex"
    elif applied < 0 or drained < 0:
        problem = "negative epoch"
    elif drained > applied:
        problem = f"drained_epoch {drained} ahead of applied_epoch {applied}"
    elif g("inflight", 0) < 0:
        problem = "negative inflight"
    elif not (_INT32_MIN <= g("pid", 0) <= _INT32_MAX):
        problem = f"pid {g('pid')} out of range"
    elif g("seq", 0) > _INT64_MAX:
        problem = f"seq {g('seq')} out of range"
    elif any("\x00" in s for s in [agent_id, inc, g("service", ""), g("host", ""), g("version", ""),
                                   g("app_name", "")] + list(g("releases") or ())):
        problem = "NUL byte in a string"
    if problem:
        raise WireError(REASON_INVALID, problem)
    return Status(agent_id=agent_id, incarnation=inc, token=token, service=g("service", ""),
                  host=g("host", ""), pid=g("pid", 0), version=g("version", ""),
                  releases=list(g("releases") or ()), seq=g("seq", 0), applied_epoch=applied,
                  drained_epoch=drained, inflight=g("inflight", 0), app_name=g("app_name", ""),
                  store_id=g("store_id", ""), sent_at=g("sent_at"), skip_grant=g("skip_grant", False),
                  leaving=g("leaving", False))


def decode_grant(body: bytes) -> Grant:
    """Decode and validate a grant message, or raise WireError."""
    d = _decode(body, KIND_GRANT, _GRANT)
    lease, epoch = d.get("lease_ms", 0), d.get("epoch", 0)
    if lease <= 0 or epoch < 0:
        raise WireError(REASON_INVALID, f"grant with lease_ms {lease}, epoch {epoch}")
    if lease > _MAX_LEASE_MS:
        raise WireError(REASON_INVALID, f"lease_ms {lease} is too large")
    return Grant(agent_id=d.get("agent_id", ""), seq=d.get("seq", 0), lease_ms=lease, epoch=epoch,
                 incarnation=d.get("incarnation", ""))


def peek_kind(body: bytes) -> str:
    """The kind a body names, for a delivery without a type property."""
    try:
        doc = _parse_json(body)
    except (ValueError, RecursionError) as e:
        raise WireError(REASON_MALFORMED, f"not JSON: {e}") from None
    dec = _Decoder()
    h: Dict[str, Any] = {}
    dec.struct({"kind": "str"}, doc, h)
    if dec.failed:
        raise WireError(REASON_MALFORMED, "kind of the wrong type")
    return h.get("kind", "")


# ---------------------------------------------------------- authentication


def _b64(text: str) -> bytes:
    # Go's base64.StdEncoding: padding required, newlines ignored.
    return base64.b64decode(text.replace("\r", "").replace("\n", ""), validate=True)


def verify(public_key: Any, body: bytes, signature: Optional[str]) -> None:
    """Check an Ed25519 signature (base64) over body; raise WireError with
    reason unsigned or bad_signature. public_key is a cryptography
    Ed25519PublicKey; None means no key configured: everything passes."""
    if public_key is None:
        return
    if not signature:
        raise WireError(REASON_UNSIGNED, "message is not signed")
    try:
        raw = _b64(signature)
    except (binascii.Error, ValueError) as e:
        raise WireError(REASON_BAD_SIGNATURE, f"signature is not base64: {e}") from None
    try:
        public_key.verify(raw, body)
    except Exception:  # InvalidSignature, or a signature of the wrong size
        raise WireError(REASON_BAD_SIGNATURE, "bad signature") from None


def mac(key: bytes, body: bytes) -> str:
    """The base64 HMAC-SHA256 of body under key."""
    return base64.b64encode(hmac.new(key, body, hashlib.sha256).digest()).decode("ascii")


def check_mac(key: Optional[bytes], body: bytes, value: Optional[str]) -> None:
    """Check a status MAC; raise WireError with reason unsigned or
    bad_signature. No key configured: everything passes."""
    if key is None:
        return
    if not value:
        raise WireError(REASON_UNSIGNED, "message is not signed")
    try:
        raw = _b64(value)
    except (binascii.Error, ValueError) as e:
        raise WireError(REASON_BAD_SIGNATURE, f"MAC is not base64: {e}") from None
    if not hmac.compare_digest(raw, hmac.new(key, body, hashlib.sha256).digest()):
        raise WireError(REASON_BAD_SIGNATURE, "bad MAC")


def load_public_key(raw: bytes) -> Any:
    """An Ed25519 public key from its 32 raw bytes."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if len(raw) != 32:
        raise ValueError(f"an Ed25519 public key is 32 bytes, got {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


def read_key_file(path: str) -> bytes:
    """A key file as 'phasecast keys generate' writes it: one line of
    base64, padded or not."""
    with open(path, "r", encoding="ascii") as f:
        text = f.read().strip()
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"key file {path}: not valid base64") from None
