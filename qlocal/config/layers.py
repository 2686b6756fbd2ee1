"""A Config resolved from its layers: defaults < YAML file < CLI flags < --set key=value; and saved.

Unknown sections and keys are errors naming the key (with the closest known one).
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any

import yaml

from qlocal import atomic
from qlocal.config.checks import check_choice, check_methods, check_ranges
from qlocal.config.coerce import coerce
from qlocal.config.sections import Config
from qlocal.errors import UserError


def _sections(cfg: Config) -> dict[str, Any]:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def _field_types(section: Any) -> dict[str, Any]:
    hints = typing.get_type_hints(type(section))
    return {f.name: hints[f.name] for f in dataclasses.fields(section)}


def _all_keys(sections: dict[str, Any]) -> list[str]:
    return [f"{name}.{key}" for name, section in sections.items() for key in _field_types(section)]


def _owners(key: str, sections: dict[str, Any]) -> str:
    """"did you mean 'model.name' or 'run.name'?" for a key some section has, else ''."""
    found = [f"'{k}'" for k in _all_keys(sections) if k.split(".", 1)[1] == key]
    return f"did you mean {' or '.join(found)}?" if found else ""


def _suggest_key(sec_name: str, key: str, sections: dict[str, Any]) -> str:
    """' (did you mean 'lora.rank'?)': always the whole dotted key to type: the sections that have
    this key (`train.rank` -> lora.rank), else the closest key of the closest section; else the
    section's keys."""
    elsewhere = _owners(key, sections)  # the exact key in another section beats a near one here
    if elsewhere:
        return f" ({elsewhere})"
    close_secs = [sec_name] if sec_name in sections else difflib.get_close_matches(sec_name, list(sections), n=1)
    for sec in close_secs:
        close = difflib.get_close_matches(key, list(_field_types(sections[sec])), n=1)
        if close:
            return f" (did you mean '{sec}.{close[0]}'?)"
    if close_secs:
        if sec_name not in sections:
            return f" (did you mean '{close_secs[0]}'?)"
        return f" (known: {', '.join(sorted(f'{sec_name}.{k}' for k in _field_types(sections[sec_name])))})"
    return f" (known sections: {', '.join(sorted(sections))})"


def apply(cfg: Config, updates: dict[str, Any], source: str) -> Config:
    """Apply flat `section.key` -> value updates (or nested dicts) onto cfg, checking every key."""
    sections = _sections(cfg)
    for dotted, value in _flatten(updates).items():
        if "." not in dotted:
            hint = _owners(dotted, sections) or "e.g. lora.rank"
            raise UserError(f"{source}: '{dotted}' is not a config key; keys look like section.key ({hint})")
        sec_name, key = dotted.split(".", 1)
        if sec_name not in sections:
            raise UserError(f"{source}: unknown config section '{sec_name}'{_suggest_key(sec_name, key, sections)}")
        section = sections[sec_name]
        types = _field_types(section)
        if key not in types:
            raise UserError(f"{source}: unknown config key '{dotted}'{_suggest_key(sec_name, key, sections)}")
        setattr(section, key, check_choice(dotted, coerce(dotted, value, types[key], source), source))
    check_ranges(cfg, source)
    return cfg


def _flatten(updates: dict[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in updates.items():
        if isinstance(v, dict) and "." not in str(k):  # a section; "data.label_map": {..} is a value
            for k2, v2 in v.items():
                # A mapping value is kept whole: dict-typed keys (data.label_map) take it, and
                # coerce rejects it for every other key.
                flat[f"{k}.{k2}"] = v2
        else:
            flat[str(k)] = v
    return flat


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a nested dict, with a clear error for a bad file."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: config file not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise UserError(f"{p}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise UserError(f"{p}: a config file must be a mapping of sections (model:, data:, lora:, train:, preference:, run:)")
    return data


def parse_set(items: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """Parse repeated `--set key=value` items; values are read as YAML scalars."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"--set {item}: expected key=value, e.g. --set lora.rank=16")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = yaml.safe_load(v) if v.strip() else None
        except yaml.YAMLError:
            out[k.strip()] = v
    return out


def build(config_file: str | None = None, flags: dict[str, Any] | None = None,
          sets: tuple[str, ...] | list[str] = ()) -> Config:
    """Resolve a Config from its layers: defaults < YAML file < CLI flags < --set."""
    cfg = Config()
    if config_file:
        apply(cfg, load_yaml(config_file), str(config_file))
    if flags:
        apply(cfg, {k: v for k, v in flags.items() if v is not None}, "command line")
    if sets:
        apply(cfg, parse_set(sets), "--set")
    check_methods(cfg, "config")
    return cfg


def from_dict(data: dict[str, Any], source: str) -> Config:
    """Rebuild a Config from a saved config.yaml."""
    cfg = apply(Config(), data, source)
    check_methods(cfg, source)
    return cfg


def save(cfg: Config, path: Path, extra: dict[str, Any] | None = None) -> None:
    """Write the resolved config (plus `extra` resolved facts under `resolved:`) atomically."""
    doc = cfg.to_dict()
    if extra:
        doc["resolved"] = extra
    atomic.write_text(path, yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))
