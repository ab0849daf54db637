"""Keys as clients send them (`Authorization: Bearer ...`, or `x-api-key` / `api-key` as
Anthropic- and Azure-style clients do), and the master key kept under LIGHTLOOP_HOME. Who a key
belongs to is `lightloop.proxy.keys`'s business."""

from __future__ import annotations

import secrets
from pathlib import Path

from lightloop.proxy.http import Scope, header

KEY_FILE = "master.key"


def request_key(scope: Scope) -> bytes | None:
    auth = header(scope, b"authorization")
    if auth is not None:
        scheme, _, token = auth.partition(b" ")
        return token.strip() if scheme.lower() == b"bearer" else auth.strip()
    return header(scope, b"x-api-key") or header(scope, b"api-key")


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
