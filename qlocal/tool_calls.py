"""Tool calls in a model's raw output: content + OpenAI-style calls, found the way Ollama finds them.

Ollama (tools/template.go parseTag, tools/tools.go Parser) takes the first text inside the TEMPLATE's
`{{ if .ToolCalls }}` block, cut at `{` and trimmed, as the tag that opens a call ("{" when nothing is
left). Text before the tag is content; after it come JSON objects naming a function and its
`arguments` (or `parameters`, Llama 3.1), one or several, bare or in an array. With "{" or "[" as the
tag a call is only looked for when the output *starts* with it (after whitespace): a JSON object in
the middle of prose is prose. With a text tag (`<tool_call>`, `[TOOL_CALLS][`) what follows the tag
and is not a call (the closing `</tool_call>`) is not content either.

The tag comes from chat_families (`tool_call_tag`, the same text the family's Ollama TEMPLATE starts
its call block with) via `template_tag`, so serving, chat, generate, verify and eval all parse the
way Ollama will after export. Where this reads structure rather than text: Ollama looks for the
declared tools' names anywhere in the buffer; this reads each object's "name" key (what every
family's template writes), so a call to an undeclared tool is returned and `check_call` says so.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import string
from dataclasses import dataclass, field
from typing import Any

from qlocal.data.tools import complete_function, split_think

_DECODER = json.JSONDecoder()
_ID_CHARS = string.ascii_letters + string.digits


@dataclass
class Parsed:
    """A model output split into what the user reads and the calls it makes."""

    content: str
    """Text outside the calls (reasoning split off into `reasoning` when asked)."""
    calls: list[dict] = field(default_factory=list)
    """Calls in qlocal's internal form: {"type": "function", "function": {"name", "arguments": dict}}."""
    tagged: bool = False
    """The output opened a tool call (the tag was found where Ollama looks for it)."""
    errors: list[str] = field(default_factory=list)
    """What after the tag failed to parse as a call (invalid JSON, no name, arguments not an object)."""
    reasoning: str | None = None
    """A leading <think>...</think> block's text, when `parse(..., thinking=True)`."""


def check_tools(value: Any) -> list[dict] | None:
    """Function schemas in the OpenAI shape (a bare {"name", "parameters"} is wrapped); None when
    empty. ValueError names the first bad entry."""
    if value in (None, []):
        return None
    if isinstance(value, dict) and isinstance(value.get("tools"), list):
        value = value["tools"]
    if not isinstance(value, list):
        raise ValueError('tools must be a list of {"type": "function", "function": {"name", "parameters"}} objects')
    out = []
    for i, t in enumerate(value):
        fn = t.get("function", t) if isinstance(t, dict) and t.get("type", "function") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValueError(f'tools[{i}] must be {{"type": "function", "function": {{"name", "parameters"}}}}')
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise ValueError(f"tools[{i}].function.parameters must be a JSON schema object")
        out.append({"type": "function", "function": complete_function(fn)})
    return out


def template_tag(template: str | None) -> str | None:
    """The tool-call tag for a Jinja chat template, or None when the template renders no tool calls.

    The family table's `tool_call_tag` for the first tool family whose marker the template contains
    (Qwen 2.5/3 and Hermes `<tool_call>`, Llama 3.1 `{`, Mistral v3 `[TOOL_CALLS][`); a template
    outside the table gets the tag derived from its own render of a call (`derive_tag`).
    """
    from qlocal.chat_families import FAMILIES

    if not template or "tool_calls" not in template:
        return None
    for fam in FAMILIES.values():
        if fam.tool_call_tag and fam.marker in template:
            return fam.tool_call_tag
    return derive_tag(template)


def derive_tag(template: str) -> str:
    """Ollama's rule applied to a Jinja template: what the template writes for an assistant turn
    that only calls a tool, before the call's `{`, trimmed (an empty thinking block set aside);
    "{" when that is nothing or the template cannot render a call."""
    from transformers.utils.chat_template_utils import render_jinja_template

    name = "qlocal_probe_tool"
    tool = {"type": "function", "function": {"name": name, "description": "probe",
                                             "parameters": {"type": "object", "properties": {}}}}
    user = {"role": "user", "content": "probe"}
    call = {"role": "assistant", "content": "", "tool_calls": [
        {"id": "abcdefghi", "type": "function", "function": {"name": name, "arguments": {}}}]}

    def render(messages: list[dict], gen: bool) -> str:
        out, _ = render_jinja_template(conversations=[messages], tools=[tool], chat_template=template,
                                       add_generation_prompt=gen, bos_token="", eos_token="")
        return out[0]

    try:
        prompt, full = render([user], True), render([user, call], False)
    except Exception:  # a template that refuses the probe: Ollama's default
        return "{"
    start = len(os.path.commonprefix([prompt, full]))
    at = full.find(f'"{name}"', start)
    brace = full.rfind("{", start, at) if at >= 0 else -1
    if brace < 0:
        return "{"
    _, rest = split_think(full[start:brace])
    tag = rest.strip()
    return tag or "{"


def _arguments(value: Any) -> tuple[dict | None, str | None]:
    if value is None:
        return {}, None
    if isinstance(value, str):  # some models write arguments as a JSON string, as OpenAI sends them
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as e:
            return None, f"arguments are not valid JSON ({e.msg})"
    if not isinstance(value, dict):
        return None, f"arguments must be a JSON object, got {type(value).__name__}"
    return value, None


def _calls_in(value: Any, names: set[str]) -> tuple[list[dict], list[str]]:
    """Calls in one decoded JSON value: an object with a name, {tool_name: {args}}, or a list of them."""
    if isinstance(value, list):
        calls: list[dict] = []
        errors: list[str] = []
        for item in value:
            c, e = _calls_in(item, names)
            calls += c
            errors += e
        return calls, errors
    if not isinstance(value, dict):
        return [], [f"expected a call object, got {type(value).__name__}"]
    fn = value["function"] if isinstance(value.get("function"), dict) else value  # OpenAI's own shape
    if isinstance(fn.get("name"), str) and fn["name"]:
        args, err = _arguments(fn.get("arguments", fn.get("parameters")))
        if err:
            return [], [f"{fn['name']}: {err}"]
        return [{"type": "function", "function": {"name": fn["name"], "arguments": args}}], []
    if len(value) == 1 and next(iter(value)) in names:  # {"get_weather": {...}}, which Ollama accepts too
        name, raw = next(iter(value.items()))
        args, err = _arguments(raw)
        return ([], [f"{name}: {err}"]) if err else ([{"type": "function", "function": {"name": name, "arguments": args}}], [])
    return [], ["a JSON object without a function 'name'"]


def parse(text: str, tag: str | None, tools: list[dict] | None = None, thinking: bool = False,
          keep_broken: bool = False) -> Parsed:
    """Split `text` into content and tool calls opened by `tag` (None: no calls are looked for).

    `tools` (OpenAI schemas) lets `{tool_name: {args}}` count as a call; `thinking` splits a
    leading <think>...</think> block into `reasoning` first (Ollama runs its thinking parser first).
    `keep_broken`: an output that opens a call but holds none that parses stays content whole (what
    a person reading chat or a client should see), where Ollama drops it (what metrics count).
    """
    reasoning = None
    if thinking:
        reasoning, text = split_think(text)
    out = _split(text, tag, tools)
    out.reasoning = reasoning
    if keep_broken and out.tagged and not out.calls:
        out.content = text
    return out


def _split(text: str, tag: str | None, tools: list[dict] | None) -> Parsed:
    if not tag:
        return Parsed(text)
    names = {t["function"]["name"] for t in tools or [] if isinstance(t.get("function"), dict)}
    braces = tag in ("{", "[")
    at = text.find(tag)
    if at < 0 or (braces and text[:at].strip()):
        return Parsed(text)
    content, pos = text[:at], at if braces else at + len(tag)
    out = Parsed(content, tagged=True)
    sep = re.compile(r"[\s,;]*" if braces else r"[\s,]*")
    while True:
        pos = sep.match(text, pos).end()
        if pos >= len(text) or text[pos] not in "{[":
            # a text tag may open the next call after the previous one's closing text (</tool_call>)
            nxt = -1 if braces or not out.calls and not out.errors else text.find(tag, pos)
            if nxt < 0:
                if not braces and not out.calls and not out.errors:
                    out.errors.append(f"no JSON call after {tag!r}")
                break
            pos = nxt + len(tag)
            continue
        try:
            value, end = _DECODER.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            out.errors.append(f"invalid JSON after {tag!r} ({e.msg})")
            nxt = -1 if braces else text.find(tag, pos + 1)
            if nxt < 0:
                return out
            pos = nxt + len(tag)
            continue
        calls, errors = _calls_in(value, names)
        out.calls += calls
        out.errors += errors
        pos = end
    if braces:  # the call ended where its JSON did: anything after it is content again
        out.content += text[pos:]
    return out


def _text(content: Any) -> str:
    """OpenAI content: a string, null, or a list of text parts."""
    if content is None:
        return ""
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return str(content)


def template_message(m: Any, where: str) -> dict:
    """One OpenAI chat message as templates read it: content a string, call arguments an object
    (OpenAI sends a JSON string, which `arguments | tojson` in Qwen's or Llama's template would
    print quoted). ValueError says what is wrong, after `where`."""
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise ValueError(f"{where} must be an object with a 'role'")
    out = {**m, "content": _text(m.get("content"))}
    if m.get("tool_calls"):
        calls = []
        for j, c in enumerate(m["tool_calls"]):
            fn = c.get("function") if isinstance(c, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise ValueError(f"{where}.tool_calls[{j}] must have a function with a 'name'")
            args = fn.get("arguments") or {}
            if isinstance(args, str):
                try:
                    args = json.loads(args) if args.strip() else {}
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}.tool_calls[{j}].function.arguments is not valid JSON ({e.msg})") from None
            calls.append({"id": c.get("id") or new_call_id(), "type": "function",
                          "function": {"name": fn["name"], "arguments": args}})
        out["tool_calls"] = calls
    return out


class StreamParser:
    """`parse` over a stream of pieces: content as soon as it cannot be the start of a call, each
    call once its JSON is complete. What `feed` and `finish` hand out, joined, is `parse` of the whole."""

    def __init__(self, tag: str | None, tools: list[dict] | None = None, keep_broken: bool = False) -> None:
        self.tag, self.tools, self.keep_broken = tag, tools, keep_broken
        self.text = ""
        self._sent = 0  # characters of content handed out
        self._calls = 0

    def feed(self, piece: str) -> tuple[str, list[dict]]:
        """(new content, newly completed calls) after `piece`."""
        self.text += piece
        return self._step(final=False)

    def finish(self) -> tuple[str, list[dict]]:
        """(the rest of the content, the last calls) at the end of the output."""
        return self._step(final=True)

    def _step(self, final: bool) -> tuple[str, list[dict]]:
        out = parse(self.text, self.tag, self.tools, keep_broken=self.keep_broken)
        if final:
            safe = len(out.content)
        elif out.tagged:
            safe = self.text.find(self.tag or "")  # content after a call waits for the end
        else:
            safe = len(self.text) - self._held()
        content = out.content[self._sent:max(safe, self._sent)]
        self._sent += len(content)
        calls = out.calls[self._calls:]
        self._calls = len(out.calls)
        return content, calls

    def _held(self) -> int:
        """How much of the end of the text could still become the tag."""
        tag = self.tag
        if not tag:
            return 0
        if tag in ("{", "[") and not self.text.strip():
            return len(self.text)  # leading whitespace may yet precede a call
        for n in range(min(len(tag) - 1, len(self.text)), 0, -1):
            if self.text.endswith(tag[:n]):
                return n
        return 0


def openai_calls(calls: list[dict], ids: list[str] | None = None) -> list[dict]:
    """Calls as OpenAI returns them: an id each, arguments as a JSON string."""
    ids = ids or [new_call_id() for _ in calls]
    return [{"id": i, "type": "function",
             "function": {"name": c["function"]["name"],
                          "arguments": json.dumps(c["function"]["arguments"], ensure_ascii=False)}}
            for i, c in zip(ids, calls)]


def new_call_id() -> str:
    """A call id of 9 letters and digits: the one shape every family's template accepts back
    (Mistral's raises on any other)."""
    return "".join(secrets.choice(_ID_CHARS) for _ in range(9))


_TYPES: dict[str, tuple[type, ...]] = {"string": (str,), "integer": (int,), "number": (int, float),
                                       "boolean": (bool,), "array": (list,), "object": (dict,), "null": (type(None),)}


def _type_ok(value: Any, kind: Any) -> bool:
    kinds = kind if isinstance(kind, list) else [kind]
    for k in kinds:
        want = _TYPES.get(k) if isinstance(k, str) else None
        if want is None:  # a type this check does not know: not held against the call
            return True
        if isinstance(value, bool) and k in ("integer", "number"):
            continue
        if isinstance(value, want):
            return True
    return False


def check_call(call: dict, tools: list[dict] | None, types: bool = False) -> list[str]:
    """What is wrong with a parsed call against the declared tools ([] = a valid call).

    A call is valid when it names a declared tool and its arguments are a JSON object holding every
    property the schema requires; `types` also checks the declared properties' JSON types and enums.
    """
    fn = call.get("function", call)
    name = fn.get("name")
    schemas = {t["function"]["name"]: t["function"] for t in tools or [] if isinstance(t.get("function"), dict)}
    if name not in schemas:
        return [f"calls {name!r}, which is not a declared tool ({', '.join(sorted(schemas)) or 'none declared'})"]
    args, err = _arguments(fn.get("arguments"))
    if err or args is None:
        return [f"{name}: {err}"]
    params = schemas[name].get("parameters") or {}
    props = params.get("properties") or {}
    problems = [f"{name}: missing required argument {r!r}" for r in params.get("required") or [] if r not in args]
    if types:
        for key, value in args.items():
            spec = props.get(key)
            if not isinstance(spec, dict):
                continue
            if "type" in spec and not _type_ok(value, spec["type"]):
                problems.append(f"{name}: argument {key!r} should be {spec['type']}, got {type(value).__name__}")
            if "enum" in spec and value not in spec["enum"]:
                problems.append(f"{name}: argument {key!r} = {value!r} is not one of {spec['enum']}")
    return problems
