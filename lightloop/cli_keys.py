"""`lightloop keys`: scoped API keys for the proxy (store/keys.py), made, listed and revoked."""

from __future__ import annotations

from typing import Any

import click
from tabulate import tabulate


@click.group()
def keys() -> None:
    """Scoped keys for the proxy: agent keys call models and report rewards; admin keys may also
    read every agent's data (/metrics, LiteLLM's admin routes). The master key is an admin key."""


def _with_conn(ctx: click.Context, action: Any) -> Any:
    from lightloop.cli import _database_url, _migrate_if_reachable, _run, _settings
    from lightloop.store.database import connect

    url = _database_url(_settings(ctx))
    _migrate_if_reachable(url)

    async def run() -> Any:
        conn = await connect(url)
        try:
            return await action(conn)
        finally:
            await conn.close()

    return _run(run())


@keys.command("create")
@click.option("--scope", type=click.Choice(["agent", "admin"]), required=True, help="What the key may do.")
@click.option("--name", default=None, help="A name to list and revoke it by (default: key-ID).")
@click.pass_context
def keys_create(ctx: click.Context, scope: str, name: str | None) -> None:
    """Make a key and print it, once, on its own line: only its hash is kept. Every proxy process
    accepts it at once."""
    from lightloop.store.keys import create_key

    if name is not None and not 0 < len(name) <= 200:
        raise click.BadParameter("a name holds 1 to 200 characters", param_hint="--name")
    try:
        record, key = _with_conn(ctx, lambda conn: create_key(conn, scope, name))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--name") from None
    click.echo(f"{record.scope} key {record.name!r} (id {record.id}); it is shown only now:", err=True)
    click.echo(key)


@keys.command("list")
@click.pass_context
def keys_list(ctx: click.Context) -> None:
    """Every key: id, name, scope, when made, last used (to within the proxies' key cache) and
    revoked. Never the key."""
    from lightloop.cli import _cell
    from lightloop.store.keys import list_keys

    found = _with_conn(ctx, list_keys)
    if not found:
        click.echo("no keys yet: make one with `lightloop keys create --scope agent`")
        return
    headers = ["id", "name", "scope", "created", "last used", "revoked"]

    def when(value: Any) -> str:
        return _cell(value.replace(microsecond=0) if value is not None else None)

    table = [
        [k.id, k.name, k.scope, when(k.created_at), when(k.last_used_at), when(k.revoked_at)] for k in found
    ]
    click.echo(tabulate(table, headers=headers, tablefmt="psql", disable_numparse=True))


@keys.command("revoke")
@click.argument("key")
@click.pass_context
def keys_revoke(ctx: click.Context, key: str) -> None:
    """Revoke KEY (its id or name). Every proxy process refuses it within
    LIGHTLOOP_PROXY__KEY_CACHE_S."""
    from lightloop.store.keys import revoke_key

    record = _with_conn(ctx, lambda conn: revoke_key(conn, key))  # unknown: NotFound, exit 1
    click.echo(f"revoked {record.scope} key {record.name!r} (id {record.id})")
