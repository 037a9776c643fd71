"""Taking passwords out of connection URLs and of error text.

The Python twin of Go's internal/config Redact and RedactError: a URL's
password (user info or a password= parameter) becomes "xxxxx", and error
text from kombu, py-amqp, psycopg2 or the broker loses every password it
quotes, whether of a configured URL or another.
"""

from __future__ import annotations

import re
from typing import Iterable, List
from urllib.parse import unquote

MASK = "xxxxx"

_USERINFO = re.compile(r"([a-zA-Z][a-zA-Z0-9+.\-]*://)([^@/\s]*)@")
_KV_PASSWORD = re.compile(r"((?:^|[\s;&?,])password\s*=\s*)('[^']*'|[^\s;&,]*)", re.IGNORECASE)


def split_urls(urls: str) -> List[str]:
    """A comma-separated list of URLs, trimmed, empty entries dropped (a
    comma in a password must be percent-encoded)."""
    return [u.strip() for u in urls.split(",") if u.strip()]


def _mask_userinfo(m: "re.Match[str]") -> str:
    user, sep, _ = m.group(2).partition(":")
    if not sep:
        return m.group(0)
    return f"{m.group(1)}{user}:{MASK}@"


def redact(conn: str) -> str:
    """conn (a URL, a list of them, or a libpq key/value string) safe to log."""
    return _KV_PASSWORD.sub(lambda m: m.group(1) + MASK, _USERINFO.sub(_mask_userinfo, conn))


def _secrets(conn: str) -> List[str]:
    out = []
    for u in split_urls(conn) + [conn]:
        m = _USERINFO.search(u)
        if m:
            _, sep, pw = m.group(2).partition(":")
            if sep and pw:
                out.extend({pw, unquote(pw)})
        for kv in _KV_PASSWORD.finditer(u):
            pw = kv.group(2).strip("'")
            if pw:
                out.append(pw)
    # Longest first, so a password that contains another is masked whole.
    return sorted(set(out), key=len, reverse=True)


def scrub(text: str, conns: Iterable[str] = ()) -> str:
    """text with every password taken out: those of conns wherever they
    appear, and the user info or password= of anything it quotes."""
    conns = [c for c in conns if c]
    for c in conns:
        text = text.replace(c, redact(c))
    text = redact(text)
    for c in conns:
        for s in _secrets(c):
            text = text.replace(s, MASK)
    return text


def scrub_error(err: BaseException, conns: Iterable[str] = ()) -> str:
    """The text of err, scrubbed: what to log or put in a raised error."""
    return scrub(f"{type(err).__name__}: {err}", conns)
