"""run_studio(): serve the studio with uvicorn; a host other than loopback always gets a token."""

from __future__ import annotations

import errno
import secrets
import socket
from pathlib import Path

from qlocal.errors import UserError, missing_extra
from qlocal.studio.security import is_loopback


def resolve_token(host: str, token: str | None) -> tuple[str | None, bool]:
    """(token to require, whether it was generated): loopback needs none unless given; any other
    host gets the given one or a fresh random one."""
    if token is not None and not token.strip():
        raise UserError("--token: empty; give a value or leave the option out")
    if token is not None or is_loopback(host):
        return token, False
    return secrets.token_urlsafe(24), True


def check_port(host: str, port: int) -> None:
    """One line before anything is printed when `host:port` cannot be bound (in use, unknown host)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no conflict
        try:
            s.bind((host, port))
        except OSError as e:
            why = "is in use (another studio?)" if e.errno == errno.EADDRINUSE else f"cannot be bound ({e.strerror})"
            raise UserError(f"{host}:{port} {why}; pick another --port or --host") from None


def run_studio(root: Path, host: str, port: int, token: str | None, echo: object = print) -> None:
    """Serve the studio over `root` until interrupted."""
    try:
        import fastapi  # noqa: F401
        import jinja2  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise missing_extra(e.name or "fastapi", "studio") from None
    from qlocal.studio.app import create_app, plotly_js

    if not root.is_dir():
        raise UserError(f"{root}: not a folder; give --root the folder that holds outputs/ and data/")
    token, generated = resolve_token(host, token)
    check_port(host, port)
    app = create_app(root, token)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://{shown}:{port}/" + (f"?token={token}" if token else "")
    say = echo if callable(echo) else print
    if plotly_js() is None:
        say("warning: plotly is not installed, charts are off: pip install 'qlocal[studio]'")
    say(f"qlocal studio over {root.resolve()}")
    if generated:
        say(f"token     {token}  (generated: every request must carry it)")
    say(f"open      {url}")
    if host in ("0.0.0.0", "::"):  # the URL above works on this machine only
        say(f"remote    http://{socket.gethostname()}:{port}/" + (f"?token={token}" if token else "")
            + "  (this machine's name; its IP address works too)")
    # Open event streams never end by themselves: give them a moment, then stop anyway.
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=3)
