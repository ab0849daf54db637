"""The dashboard's sign-in session: an HttpOnly, SameSite=Strict cookie that names the key that
signed in by its digest (the SHA-256 `api_keys` stores), with an expiry, signed with HMAC under a
secret derived from the master key. Any proxy process can check it without shared state; a
revoked key's sessions end with the key (the digest is looked up like a key); a new master key
ends every session. The key itself never leaves the sign-in form: not in the cookie, not in a URL.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time

from lightloop.proxy.http import Scope, header

COOKIE = "lightloop_session"
LIFETIME_S = 12 * 3600
_WELL_FORMED = re.compile(r"[0-9]{1,12}\.[0-9a-f]{64}\.[0-9a-f]{64}")


def session_secret(master_key: bytes) -> bytes:
    return hmac.new(master_key, b"lightloop dashboard session v1", hashlib.sha256).digest()


def make_session(secret: bytes, key_digest: str, now: float | None = None) -> str:
    expires = int((time.time() if now is None else now) + LIFETIME_S)
    payload = f"{expires}.{key_digest}"
    return f"{payload}.{_sign(secret, payload)}"


def read_session(secret: bytes, value: str, now: float | None = None) -> str | None:
    """The key digest a session cookie names; None when it is forged, malformed or expired."""
    if not _WELL_FORMED.fullmatch(value):  # before any comparison: ASCII hex only
        return None
    expires, key_digest, signature = value.split(".")
    if not hmac.compare_digest(signature.encode(), _sign(secret, f"{expires}.{key_digest}").encode()):
        return None
    if int(expires) <= (time.time() if now is None else now):
        return None
    return key_digest


def session_cookie(scope: Scope) -> str | None:
    """The session cookie's value. Parsed by hand, not with SimpleCookie, which drops every
    cookie of a header when one of them (another app's on the same host) is malformed."""
    raw = header(scope, b"cookie")
    if raw is None:
        return None
    for part in raw.decode("latin-1").split(";"):
        name, _, value = part.strip().partition("=")
        if name == COOKIE:
            return value.strip().strip('"')
    return None


def set_cookie(value: str, secure: bool) -> tuple[bytes, bytes]:
    """The Set-Cookie header: HttpOnly (no script reads it), SameSite=Strict (no other site's
    page sends it), Secure when served over HTTPS."""
    flags = f"; Path=/; Max-Age={LIFETIME_S}; HttpOnly; SameSite=Strict" + ("; Secure" if secure else "")
    return b"set-cookie", f"{COOKIE}={value}{flags}".encode()


def clear_cookie(secure: bool) -> tuple[bytes, bytes]:
    flags = "; Path=/; Max-Age=0; HttpOnly; SameSite=Strict" + ("; Secure" if secure else "")
    return b"set-cookie", f"{COOKIE}={flags}".encode()


def _sign(secret: bytes, payload: str) -> str:
    return hmac.new(secret, payload.encode(), hashlib.sha256).hexdigest()
