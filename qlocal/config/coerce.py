"""A YAML or command-line value turned into its field's type, or an error naming the key."""

from __future__ import annotations

import typing
from typing import Any

from qlocal.errors import UserError


def coerce(key: str, value: Any, hint: Any, source: str) -> Any:
    """Convert a YAML/CLI value to the field's type, or raise a UserError naming the key."""
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args and typing.get_origin(hint) not in (list, dict) else hint
    if value is None or (isinstance(value, str) and value.lower() in ("null", "none") and optional):
        if optional:
            return None
        raise UserError(f"{source}: '{key}' cannot be empty")
    try:
        if typing.get_origin(base) is dict:
            return _coerce_mapping(key, value, source)
        if isinstance(value, dict):  # a nested mapping under a scalar key is a typo, never a value
            raise ValueError
        if typing.get_origin(base) is list:
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list):
                raise ValueError
            return [str(v) for v in value]
        if base is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes", "on"):
                return True
            if str(value).lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        name = getattr(base, "__name__", str(base))
        raise UserError(f"{source}: '{key}' must be {name}, got {value!r}") from None


def _scalar_text(value: Any) -> str:
    # YAML reads `0:` as int and `yes:` as bool; keys and values of a mapping are compared as text.
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _coerce_mapping(key: str, value: Any, source: str) -> dict[str, str]:
    """A {text: text} mapping (data.columns, data.label_map); scalar keys and values only."""
    if not isinstance(value, dict):
        raise UserError(f"{source}: '{key}' must be a mapping like {{a: b}}, got {value!r}")
    out = {}
    for k, v in value.items():
        if v is None or isinstance(v, (dict, list)):
            raise UserError(f"{source}: '{key}.{k}' must be a single value (text or number), got {v!r}")
        out[_scalar_text(k)] = _scalar_text(v)
    return out
