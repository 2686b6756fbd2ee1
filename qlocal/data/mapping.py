"""Field mapping: turn records of any shape into chat samples, from the `data` config section.

Two ways, combinable:

  columns            {system|user|assistant|messages|text|tools: column}: a column becomes that turn (or
                     the conversation list, raw text, or the function schemas the template renders).
                     `columns: {user: question, assistant: answer}`
  prompt_template    the user / assistant / system turn built from several fields, str.format style:
  response_template  "Case:\\n{case_description}\\n\\nProcess:\\n{consultation_process}". List values are
  system_prompt      joined with newlines; {{ and }} are literal braces; {a[b]} reaches into objects.
  label_map          {label value: answer text} for the field `label_field` (default "label"): the
                     answer of a classification set, and what templates see as {label}.

A mapping that builds the user and assistant turns yields Samples directly; one that only renames
`messages`/`text` (plus `system`) hands a standard record back to the format detector. Every
problem in a record names its file:line and the field. Framework-free.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass, field
from typing import Any

from qlocal.data.formats import Sample
from qlocal.data.loader import SKIP_HINT
from qlocal.data.tools import parse_tools
from qlocal.errors import UserError

COLUMN_KEYS = ("system", "user", "assistant", "messages", "text", "tools")
TEMPLATE_KEYS = ("prompt_template", "response_template", "system_prompt")


def as_text(value: Any) -> str:
    """A field value as template text: lists joined with newlines, objects as JSON, numbers as text."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        return "\n".join(as_text(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # a CSV/parquet label 1.0 is the label "1"
    return str(value)


class _Missing(Exception):
    def __init__(self, name: str) -> None:
        self.name = name


class _Formatter(string.Formatter):
    """str.format over a record: values stay raw for {a[b]} indexing and become text when placed."""

    def get_value(self, key: int | str, args: Any, kwargs: Any) -> Any:
        if key not in kwargs or kwargs[key] is None:
            raise _Missing(str(key))
        return kwargs[key]

    def get_field(self, field_name: str, args: Any, kwargs: Any) -> Any:
        try:
            return super().get_field(field_name, args, kwargs)
        except (KeyError, IndexError, TypeError, AttributeError):
            raise _Missing(field_name) from None

    def format_field(self, value: Any, format_spec: str) -> str:
        return format(as_text(value), format_spec)


_FMT = _Formatter()


def template_fields(template: str, key: str) -> list[str]:
    """The field names a template uses; a malformed template or a positional {} is a UserError."""
    try:
        parsed = list(_FMT.parse(template))
    except ValueError as e:
        raise UserError(f"data.{key}: not a valid template ({e}); write fields as {{name}} and literal braces as {{{{ }}}}") from None
    names = []
    for _, name, _, _ in parsed:
        if name is None:
            continue
        root = name.split("[", 1)[0].split(".", 1)[0]
        if not root or root.isdigit():
            raise UserError(f"data.{key}: '{{{name}}}' needs a field name, like {{text}}")
        names.append(root)
    return names


def _keys(record: dict) -> str:
    keys = sorted(map(str, record))
    return ", ".join(keys[:12]) + (", ..." if len(keys) > 12 else "") or "none"


@dataclass
class Mapping:
    """A validated field mapping (see the module docstring)."""

    columns: dict[str, str] = field(default_factory=dict)
    prompt_template: str | None = None
    response_template: str | None = None
    system_prompt: str | None = None
    label_map: dict[str, str] = field(default_factory=dict)
    label_field: str = "label"

    @property
    def builds_turns(self) -> bool:
        """True when the mapping makes user/assistant turns itself (vs. renaming messages/text)."""
        return bool(self.prompt_template or self.response_template or self.label_map
                    or {"user", "assistant"} & set(self.columns))

    def check(self, fmt: str = "auto") -> "Mapping":
        """Check the mapping is complete and consistent; errors name the config key and the fix."""
        unknown = [k for k in self.columns if k not in COLUMN_KEYS]
        if unknown:
            raise UserError(f"data.columns: unknown role '{unknown[0]}'; use {', '.join(COLUMN_KEYS)} "
                            "(e.g. columns: {user: question, assistant: answer})")
        for key in TEMPLATE_KEYS:
            value = getattr(self, key)
            if value is not None:
                template_fields(value, key)
        for a, b in (("prompt_template", "user"), ("response_template", "assistant"), ("system_prompt", "system")):
            if getattr(self, a) is not None and b in self.columns:
                raise UserError(f"data.{a} and data.columns.{b} both set the {b} turn; keep one")
        whole = [k for k in ("messages", "text") if k in self.columns]
        if len(whole) == 2:
            raise UserError("data.columns: 'messages' and 'text' are two different formats; keep one")
        if "tools" in self.columns and "text" in self.columns:
            raise UserError("data.columns.tools does not apply to raw text (data.columns.text); drop one")
        if self.builds_turns:
            if whole:
                raise UserError(f"data.columns.{whole[0]} cannot be combined with user/assistant turns "
                                "built by data.columns/prompt_template/response_template/label_map; keep one way")
            if self.prompt_template is None and "user" not in self.columns:
                raise UserError("the data mapping has no user turn; set data.prompt_template or data.columns.user")
            if self.response_template is None and "assistant" not in self.columns and not self.label_map:
                raise UserError("the data mapping has no assistant turn; set data.response_template, "
                                "data.columns.assistant or data.label_map")
            if fmt != "auto":
                raise UserError(f"data.format={fmt} does not apply when the data mapping builds the turns; "
                                "leave data.format at auto")
        elif "text" in self.columns and self.system_prompt is not None:
            raise UserError("data.system_prompt does not apply to raw text (data.columns.text); drop one")
        return self

    # -- applying ---------------------------------------------------------------------------

    def _fields(self, record: dict, where: str) -> dict:
        if not self.label_map:
            return record
        return {**record, self.label_field: self.label_of(record, where)}

    def label_of(self, record: dict, where: str) -> str:
        """The answer text label_map gives this record's label."""
        if record.get(self.label_field) is None:
            raise UserError(f"{where}: label field '{self.label_field}' (data.label_field) is missing "
                            f"(record has: {_keys(record)}); {SKIP_HINT}")
        value = as_text(record[self.label_field])
        if value not in self.label_map:
            known = ", ".join(repr(k) for k in list(self.label_map)[:10])
            raise UserError(f"{where}: label {value!r} has no entry in data.label_map (known: {known}); "
                            f"add it or {SKIP_HINT}")
        return self.label_map[value]

    def _render(self, key: str, fields: dict, where: str) -> str:
        template = getattr(self, key)
        try:
            return _FMT.vformat(template, (), fields)
        except _Missing as m:
            raise UserError(f"{where}: field '{m.name}' named in data.{key} is missing or null "
                            f"(record has: {_keys(fields)}); fix the record or the template, or pass --skip-bad-lines") from None

    def _column(self, role: str, record: dict, where: str) -> Any:
        col = self.columns[role]
        if record.get(col) is None:
            raise UserError(f"{where}: column '{col}' (data.columns.{role}) is missing or null "
                            f"(record has: {_keys(record)}); {SKIP_HINT}")
        return record[col]

    def _turn(self, template_key: str, role: str, fields: dict, where: str) -> str | None:
        if getattr(self, template_key) is not None:
            return self._render(template_key, fields, where)
        if role in self.columns:
            return as_text(self._column(role, fields, where))
        return None

    def apply(self, record: dict, where: str) -> Sample | dict:
        """Map one record: a chat Sample when the mapping builds the turns, else the record with
        data.columns.messages/text renamed to the standard key, for the format detector."""
        if not isinstance(record, dict):
            raise UserError(f"{where}: a record must be a JSON object; {SKIP_HINT}")
        tools_col = self.columns.get("tools", "tools")
        if not self.builds_turns:
            for key in ("messages", "text"):
                if key in self.columns:
                    out = {key: self._column(key, record, where)}
                    if key == "messages" and record.get(tools_col) is not None:
                        out["tools"] = record[tools_col]  # the renamed chat keeps its schemas
                    return out
            return record
        fields = self._fields(record, where)
        system = self._turn("system_prompt", "system", fields, where)
        user = self._turn("prompt_template", "user", fields, where) or ""
        answer = self._turn("response_template", "assistant", fields, where)
        if answer is None:  # label_map alone gives the answer
            answer = fields[self.label_field]
        if not answer.strip():
            raise UserError(f"{where}: the mapped assistant turn is empty, so there is nothing to train on; {SKIP_HINT}")
        messages = [{"role": "system", "content": system}] if system else []
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        tools = parse_tools(self._column("tools", record, where), where, tools_col) if "tools" in self.columns else None
        return Sample("chat", messages=messages, where=where, tools=tools)


    def add_system(self, sample: Sample, record: dict, where: str) -> Sample:
        """Give a detected-format chat sample the mapped system turn, unless it has its own."""
        if sample.kind != "chat" or (self.system_prompt is None and "system" not in self.columns):
            return sample
        if sample.messages and sample.messages[0]["role"] == "system":
            return sample
        system = self._turn("system_prompt", "system", record, where)
        if system:
            sample.messages.insert(0, {"role": "system", "content": system})
        return sample


def mapping_from_config(data_cfg: Any) -> Mapping | None:
    """The checked Mapping of a DataConfig, or None when it sets no mapping key."""
    m = Mapping(columns=dict(getattr(data_cfg, "columns", None) or {}),
                prompt_template=getattr(data_cfg, "prompt_template", None),
                response_template=getattr(data_cfg, "response_template", None),
                system_prompt=getattr(data_cfg, "system_prompt", None),
                label_map=dict(getattr(data_cfg, "label_map", None) or {}),
                label_field=getattr(data_cfg, "label_field", "label") or "label")
    if not (m.columns or m.label_map or any(getattr(m, k) is not None for k in TEMPLATE_KEYS)):
        return None
    return m.check(getattr(data_cfg, "format", "auto"))
