"""The one exception type a user can cause: the CLI prints its message on one line and exits 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (file, line, key, missing extra). Message names it and the fix."""


def missing_extra(module: str, extra: str) -> UserError:
    """Error for an optional dependency that is not installed."""
    return UserError(f"{module} is not installed: pip install 'qlocal[{extra}]'")
