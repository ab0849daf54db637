"""The dashboard (`/ui`): server-rendered page shells (Jinja2, autoescaped) whose figures a small
script fills from the `/v1/stats/...` JSON routes and refreshes while a run goes on; the chart
library (uPlot) is vendored under proxy/web/static. No build step, nothing fetched at install.

Signing in takes a key in a form and sets the session cookie (proxy/session.py); pages need an
admin key's session, as the JSON they show is every agent's data. A page asked for without a
session redirects to the sign-in form; an error on a page is an HTML page, not JSON."""

from __future__ import annotations

import hmac
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

from jinja2 import Environment, FileSystemLoader, select_autoescape

from lightloop.proxy.errors import NotFound, ProxyError, Unauthorized
from lightloop.proxy.http import Scope, Send, respond
from lightloop.proxy.keys import Caller, Keys
from lightloop.proxy.session import clear_cookie, make_session, set_cookie
from lightloop.store import digest

WEB = Path(__file__).parent / "web"
HTML = b"text/html; charset=utf-8"
# Pages run only the dashboard's own script and styles: no inline script, nothing from elsewhere.
_PAGE_HEADERS = (
    (b"content-security-policy", b"default-src 'self'; img-src 'self' data:; frame-ancestors 'none'"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
    (b"x-content-type-options", b"nosniff"),
)
# What /ui/static/{file} serves: a fixed list, so no path a client sends reaches the file system.
_STATIC_FILES = {
    "app.js": (WEB / "static" / "app.js", b"text/javascript; charset=utf-8"),
    "style.css": (WEB / "static" / "style.css", b"text/css; charset=utf-8"),
    "uPlot.iife.min.js": (
        WEB / "static" / "vendor" / "uplot" / "uPlot.iife.min.js",
        b"text/javascript; charset=utf-8",
    ),
    "uPlot.min.css": (WEB / "static" / "vendor" / "uplot" / "uPlot.min.css", b"text/css; charset=utf-8"),
}
STATIC = {name: (path.read_bytes(), media) for name, (path, media) in _STATIC_FILES.items()}
PAGES = {
    "overview": "Overview",
    "training": "Training",
    "rollouts": "Rollouts",
    "datasets": "Datasets",
}
_templates = Environment(
    loader=FileSystemLoader(WEB / "templates"), autoescape=select_autoescape(default=True), auto_reload=False
)


def render(template: str, **context: Any) -> bytes:
    return _templates.get_template(template).render(pages=PAGES, **context).encode()


async def page(send: Send, name: str, status: int = 200, **context: Any) -> int:
    await respond(send, status, render(f"{name}.html", page=name, **context), HTML, _PAGE_HEADERS)
    return status


async def error_page(send: Send, exc: ProxyError) -> None:
    """A page route's error as a page (the JSON routes answer OpenAI-shaped JSON instead)."""
    body = render("error.html", page="error", status=exc.status, message=str(exc))
    await respond(send, exc.status, body, HTML, _PAGE_HEADERS)


async def redirect(send: Send, location: str, *headers: tuple[bytes, bytes]) -> int:
    await respond(send, 303, b"", HTML, ((b"location", location.encode()), *headers, *_PAGE_HEADERS))
    return 303


async def to_sign_in(send: Send, scope: Scope) -> int:
    target = scope["path"] + (
        f"?{scope['query_string'].decode('latin-1')}" if scope.get("query_string") else ""
    )
    return await redirect(send, "/ui/login?next=" + quote(target, safe=""))


def safe_next(value: str | None) -> str:
    """Where to go after signing in: a dashboard path only, never another site (`//evil`)."""
    if (
        value
        and value.startswith("/ui")
        and "\\" not in value
        and all(" " < ch < "\x7f" for ch in value)  # no control characters in a Location header
    ):
        return value
    return "/ui"


async def sign_in_form(scope: Scope, send: Send) -> int:
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    return await page(send, "login", next=safe_next(next(iter(query.get("next", [])), None)))


async def sign_in(scope: Scope, body: bytes, keys: Keys, master_key: bytes, secret: bytes, send: Send) -> int:
    """POST /ui/session: the form's key, checked like any key; an admin key gets a session."""
    try:
        form = parse_qs(body.decode("utf-8", errors="replace"), max_num_fields=8)
    except ValueError:
        return await page(send, "login", 400, next="/ui", error="The form could not be read.")
    key = (form.get("key") or [""])[0].strip()
    target = safe_next(next(iter(form.get("next", [])), None))
    if not key:
        return await page(send, "login", 400, next=target, error="Enter a key.")
    try:
        caller = await keys.identify(key.encode())
    except Unauthorized:
        caller = None
    if caller is None:
        return await page(send, "login", 401, next=target, error="That key is not valid for this proxy.")
    if caller.scope != "admin":
        message = f"Key {caller.name!r} is an agent key: the dashboard needs an admin key."
        return await page(send, "login", 403, next=target, error=message)
    key_digest = digest(master_key) if hmac.compare_digest(key.encode(), master_key) else digest(key)
    secure = scope.get("scheme") == "https"
    return await redirect(send, target, set_cookie(make_session(secret, key_digest), secure))


async def sign_out(scope: Scope, send: Send) -> int:
    return await redirect(send, "/ui/login", clear_cookie(scope.get("scheme") == "https"))


async def static(name: str, send: Send) -> int:
    found = STATIC.get(name)
    if found is None:
        raise NotFound(f"no static file {name[:60]!r}")
    body, media = found
    await respond(send, 200, body, media, ((b"cache-control", b"no-cache"),))
    return 200


def signed_in_as(caller: Caller) -> str:
    return "master key" if caller.name == "master" else f"key {caller.name}"
