"""What the studio lets a browser do: the token on every request, same-origin POSTs, Host names
on an unauthenticated loopback bind, and paths confined to the working folders."""

from __future__ import annotations

import hmac
from pathlib import Path
from typing import Any, Awaitable, Callable
from urllib.parse import urlsplit

# The folders under the studio's root that a browser may name paths in.
WORKING_FOLDERS = ("outputs", "export", "data", "models")
TOKEN_COOKIE = "qlocal_studio_token"
TOKEN_HEADER = "x-qlocal-token"
LOOPBACK_NAMES = {"127.0.0.1", "localhost", "::1", "[::1]"}
_SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}


class PathRefused(ValueError):
    """A path from the browser that leaves the working folders (answered 403)."""


def is_loopback(host: str) -> bool:
    """True for a bind address only this machine can reach."""
    return host in LOOPBACK_NAMES or host.startswith("127.")


def confine(root: Path, value: str | Path, folders: tuple[str, ...] = WORKING_FOLDERS) -> Path:
    """`value` (relative to root, or absolute) as a resolved path inside one of root's working
    folders; `..` anywhere, or a path (symlinks resolved) that lands elsewhere, raises PathRefused."""
    text = str(value)
    if not text or "\x00" in text:
        raise PathRefused(f"{text!r}: not a path")
    p = Path(text)
    if ".." in p.parts:
        raise PathRefused(f"{text}: '..' is not allowed; give a path inside {', '.join(folders)}/")
    base = root.resolve()
    full = (p if p.is_absolute() else base / p).resolve()
    for name in folders:
        top = (base / name).resolve()
        if full == top or top in full.parents:
            return full
    raise PathRefused(f"{text}: outside the studio's working folders ({', '.join(f + '/' for f in folders)} under {base}); "
                      "copy it into one of them (a symlink out is refused), or start qlocal studio with --root above it")


def _token_of(scope_headers: dict[str, str], query: str, cookies: dict[str, str]) -> str | None:
    auth = scope_headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    if TOKEN_HEADER in scope_headers:
        return scope_headers[TOKEN_HEADER]
    from urllib.parse import parse_qs

    given = parse_qs(query).get("token")
    if given:
        return given[0]
    return cookies.get(TOKEN_COOKIE)


def _same_origin(headers: dict[str, str]) -> bool:
    """The Origin (or, lacking it, the Referer) names the host:port the request was sent to."""
    host = headers.get("host", "")
    source = headers.get("origin") or headers.get("referer")
    if not source or source == "null" or not host:
        return False
    return urlsplit(source).netloc == host


def _host_name(host_header: str) -> str:
    if host_header.startswith("["):
        return host_header.split("]")[0] + "]"
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


class Guard:
    """ASGI middleware: every HTTP request passes here before any route or static file.

    With a token: the request must carry it (Bearer header, X-Qlocal-Token, ?token= which also
    sets an HttpOnly SameSite=Strict cookie, or that cookie), else 401. Without a token (loopback
    bind): the Host header must be a loopback name, which stops DNS-rebinding pages.
    A state-changing request (POST, ...) must come from the same origin, or carry the token in a
    header (scripts and tests); a cookie alone never suffices for it.
    """

    def __init__(self, app: Callable[..., Awaitable[Any]], token: str | None) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "websocket":  # the studio serves none; refuse rather than pass one unchecked
            return await send({"type": "websocket.close", "code": 1008})
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        cookies = _cookies(headers.get("cookie", ""))
        query = scope.get("query_string", b"").decode("latin-1")
        method = scope.get("method", "GET")
        set_cookie = False
        if self.token is not None:
            given = _token_of(headers, query, cookies)
            if given is None or not hmac.compare_digest(given.encode(), self.token.encode()):
                return await _plain(send, 401, "401: this studio needs its token (open the URL it printed, "
                                          "or send 'Authorization: Bearer <token>')\n",
                                    [(b"www-authenticate", b"Bearer")])
            set_cookie = cookies.get(TOKEN_COOKIE) != self.token
            header_token = "authorization" in headers or TOKEN_HEADER in headers
        else:
            if _host_name(headers.get("host", "")) not in LOOPBACK_NAMES:
                return await _plain(send, 403, "403: Host must be 127.0.0.1 or localhost on a studio without a token\n")
            header_token = False
        if method not in _SAFE_METHODS and not (header_token or _same_origin(headers)):
            return await _plain(send, 403, "403: cross-origin request refused (Origin must match Host)\n")
        if not set_cookie:
            return await self.app(scope, receive, send)

        async def send_with_cookie(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                cookie = f"{TOKEN_COOKIE}={self.token}; HttpOnly; SameSite=Strict; Path=/"
                message = {**message, "headers": [*message.get("headers", []), (b"set-cookie", cookie.encode())]}
            await send(message)

        await self.app(scope, receive, send_with_cookie)


def _cookies(header: str) -> dict[str, str]:
    out = {}
    for part in header.split(";"):
        if "=" in part:
            k, v = part.split("=", 1)
            out[k.strip()] = v.strip()
    return out


async def _plain(send: Any, status: int, text: str, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    body = text.encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(body)).encode()), *(extra or [])]})
    await send({"type": "http.response.body", "body": body})
