"""Keys: the proxy accepts LiteLLM's master key, sent the way OpenAI clients send keys
(`Authorization: Bearer ...`) or as `x-api-key` / `api-key` (Anthropic- and Azure-style clients).

Virtual keys live in LiteLLM's own (Prisma) database, which lightloop does not run; the
LiteLLM lane still checks them itself when an operator configures one."""

from __future__ import annotations

import hmac
import secrets
from pathlib import Path

from lightloop.proxy.errors import Unauthorized
from lightloop.proxy.http import Scope, header

KEY_FILE = "master.key"


def request_key(scope: Scope) -> bytes | None:
    auth = header(scope, b"authorization")
    if auth is not None:
        scheme, _, token = auth.partition(b" ")
        return token.strip() if scheme.lower() == b"bearer" else auth.strip()
    return header(scope, b"x-api-key") or header(scope, b"api-key")


def check_key(scope: Scope, master_key: bytes) -> None:
    key = request_key(scope)
    if key is None:
        raise Unauthorized("no API key: send it as 'Authorization: Bearer <key>'")
    if not hmac.compare_digest(key, master_key):
        raise Unauthorized("the API key is not valid for this proxy")


def load_or_create_master_key(home: Path) -> tuple[str, bool]:
    """The key kept under `home` (made on first use, readable by its owner only); True when new.

    LiteLLM refuses weak keys; this is its own recommended form, `sk-` and 32 random bytes."""
    path = home / KEY_FILE
    if path.is_file():
        key = path.read_text().strip()
        if key:
            return key, False
    home.mkdir(parents=True, exist_ok=True)
    key = "sk-" + secrets.token_hex(32)
    tmp = path.with_suffix(".tmp")
    tmp.touch(mode=0o600)
    tmp.chmod(0o600)
    tmp.write_text(key + "\n")
    tmp.replace(path)
    return key, True
