"""Tool schemas, tool calls, tool results and reasoning: one internal form for every format (issue 15).

The internal form is the one Hugging Face chat templates read (OpenAI's shape):

  Sample.tools  [{"type": "function", "function": {"name", "description", "parameters"}}], or None
  assistant     {"role": "assistant", "content": str,
                 "tool_calls": [{"id", "type": "function", "function": {"name", "arguments": dict}}],
                 "reasoning_content": str}        (the last two keys only when there are calls / thinking)
  tool          {"role": "tool", "content": str, "tool_call_id": str, "name": str}

Accepted on the way in:
  OpenAI        `tools` per record (or a file named by data.tools); assistant `tool_calls` whose
                arguments are a JSON string or an object, `content` null, empty or text; legacy
                `function_call`; `tool` messages with tool_call_id/name; several and parallel calls.
  ShareGPT /    `function_call` turns whose value is a JSON call {"name", "arguments"} or a list of
  LLaMA-Factory them (parallel), `observation` turns with the results, `tools` as a JSON string.
                After N > 1 parallel calls, one observation holding a JSON array of N items is N results.
  Reasoning     assistant `reasoning_content`, `reasoning` or `thinking`, or a leading
                <think>...</think> block in content (the field wins when both are given).

Schema property names and argument keys are put in sorted order (recursively): Ollama hands a
TEMPLATE its tools and calls as Go maps, which iterate sorted, so training on that order is what
makes the exported model see in Ollama exactly the text it was trained on. JSON objects mean the
same in any key order, so nothing is lost.

Arguments are kept as objects: several real templates (Qwen2.5, Llama 3.1) write `arguments | tojson`,
which would double-encode a string. Calls without an id get "call" + 5 digits (9 alphanumerics, what
Mistral's template demands), numbered through the conversation, so the same chat written in either
format renders to the same ids; results without a tool_call_id/name answer the calls before them in order.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from qlocal.errors import UserError

SKIP = "fix the record or pass --skip-bad-lines"
REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")
_THINK = re.compile(r"^\s*<think>(.*?)</think>", re.S)


def ollama_order(value: Any) -> Any:
    """Dict keys sorted, recursively (lists keep their order): how Ollama's Go maps iterate."""
    if isinstance(value, dict):
        return {k: ollama_order(value[k]) for k in sorted(value)}
    return [ollama_order(v) for v in value] if isinstance(value, list) else value


def _sorted_properties(schema: Any) -> Any:
    """A JSON schema whose `properties` (at every depth) are in sorted order; other keys keep theirs."""
    if isinstance(schema, list):
        return [_sorted_properties(v) for v in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _sorted_properties(v) for k, v in schema.items()}
    if isinstance(schema.get("properties"), dict):
        out["properties"] = {k: _sorted_properties(schema["properties"][k]) for k in sorted(schema["properties"])}
    return out


def _json(value: Any, where: str, loc: str, what: str) -> Any:
    """A JSON-string field decoded (objects/lists pass through)."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: '{loc}' is not valid JSON ({e.msg}: column {e.colno}); it must be {what}; {SKIP}") from None


def parse_tools(value: Any, where: str, loc: str = "tools") -> list[dict] | None:
    """Function schemas in the OpenAI shape, from a list or a JSON string of one; None when empty."""
    if value is None or value == "" or value == []:
        return None
    value = _json(value, where, loc, "a list of function schemas")
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise UserError(f"{where}: '{loc}' must be a list of function schemas, got {type(value).__name__}; {SKIP}")
    out = []
    for i, tool in enumerate(value):
        fn = tool.get("function", tool) if isinstance(tool, dict) and tool.get("type", "function") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise UserError(f"{where}: '{loc}[{i}]' must be a function schema with a 'name' "
                            f"({{\"type\": \"function\", \"function\": {{\"name\", \"description\", \"parameters\"}}}}); {SKIP}")
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise UserError(f"{where}: '{loc}[{i}].parameters' must be a JSON schema object; {SKIP}")
        if fn.get("parameters") is not None:
            fn = {**fn, "parameters": _sorted_properties(fn["parameters"])}
        out.append({"type": "function", "function": complete_function(fn)})
    return out


def complete_function(fn: dict) -> dict:
    """A function schema with `description` ("") and `parameters` (an empty object schema) filled in
    when absent: real templates (Hermes, Llama 3.1) read both and fail on a schema that lacks them."""
    out = dict(fn)
    if out.get("description") is None:
        out["description"] = ""
    if out.get("parameters") is None:
        out["parameters"] = {"type": "object", "properties": {}}
    return out


def load_tools_file(path: str) -> list[dict]:
    """The schemas of a data.tools file: a JSON list of them (or {"tools": [...]})."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"data.tools: {path} not found; point it at a JSON file holding a list of function schemas")
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"data.tools: {path} is not valid UTF-8 JSON ({e}); fix the file") from None
    if isinstance(doc, dict) and "tools" in doc:
        doc = doc["tools"]
    tools = parse_tools(doc, path)
    if not tools:
        raise UserError(f"data.tools: {path} holds no function schemas")
    return tools


def _arguments(value: Any, where: str, loc: str) -> dict:
    if value is None or value == "":
        return {}
    value = _json(value, where, loc, "a JSON object of arguments")
    if not isinstance(value, dict):
        raise UserError(f"{where}: '{loc}' must be a JSON object of arguments, got {type(value).__name__}; {SKIP}")
    return ollama_order(value)


def parse_calls(value: Any, where: str, loc: str) -> list[dict]:
    """Tool calls in the internal form, from OpenAI `tool_calls` or a ShareGPT function_call value."""
    value = _json(value, where, loc, 'a call {"name", "arguments"} or a list of calls')
    calls = value if isinstance(value, list) else [value]
    out = []
    for i, call in enumerate(calls):
        here = f"{loc}[{i}]" if isinstance(value, list) else loc
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise UserError(f"{where}: '{here}' must be a call with a function 'name' and 'arguments'; {SKIP}")
        args = fn.get("arguments", fn.get("parameters"))
        entry = {"type": "function", "function": {"name": fn["name"], "arguments": _arguments(args, where, f"{here}.arguments")}}
        if isinstance(call.get("id"), str) and call["id"]:
            entry = {"id": call["id"], **entry}
        out.append(entry)
    if not out:
        raise UserError(f"{where}: '{loc}' holds no calls; {SKIP}")
    return out


def split_think(content: str) -> tuple[str | None, str]:
    """(reasoning, answer) of a content that opens with <think>...</think>, as Qwen3's template splits it."""
    m = _THINK.match(content)
    if not m:
        return None, content
    return m.group(1).strip("\n"), content[m.end():].lstrip("\n")


def assistant_turn(turn: dict, content: str | None, role_tag: str, where: str, loc: str) -> dict:
    """An assistant message with its calls and reasoning; content None is allowed when it calls."""
    msg: dict[str, Any] = {"role": "assistant", "content": content or ""}
    if role_tag == "function_call":  # ShareGPT: the whole value is the call
        msg["content"] = ""
        msg["tool_calls"] = parse_calls(content, where, f"{loc}.value")
    elif turn.get("tool_calls") not in (None, []):
        msg["tool_calls"] = parse_calls(turn["tool_calls"], where, f"{loc}.tool_calls")
    elif isinstance(turn.get("function_call"), dict):  # OpenAI's legacy single call
        msg["tool_calls"] = parse_calls(turn["function_call"], where, f"{loc}.function_call")
    if content is None and "tool_calls" not in msg:
        raise UserError(f"{where}: '{loc}' has no 'content' and no 'tool_calls'; {SKIP}")
    reasoning, msg["content"] = split_think(msg["content"])
    for key in REASONING_KEYS:
        if isinstance(turn.get(key), str) and turn[key].strip():
            reasoning = turn[key].strip("\n")
            break
    if reasoning and reasoning.strip():
        msg["reasoning_content"] = reasoning
    return msg


def tool_turn(turn: dict, content: Any, where: str, loc: str) -> dict:
    """A tool result: its text (objects as JSON) plus whatever id/name the record names."""
    if content is None:
        raise UserError(f"{where}: '{loc}' has no 'content' (the tool's result); {SKIP}")
    text = content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)
    msg = {"role": "tool", "content": text}
    for key in ("tool_call_id", "name"):
        if isinstance(turn.get(key), str) and turn[key]:
            msg[key] = turn[key]
    return msg


def link_results(messages: list[dict]) -> list[dict]:
    """Give calls without an id a positional one, split a parallel observation, and give results
    without tool_call_id/name those of the calls they answer (in order after each calling turn)."""
    n = 0
    out: list[dict] = []
    pending: list[dict] = []
    for msg in messages:
        if msg["role"] == "assistant" and msg.get("tool_calls"):
            for call in msg["tool_calls"]:
                n += 1
                call.setdefault("id", f"call{n:05d}")
            msg["tool_calls"] = [{"id": c["id"], "type": "function", "function": c["function"]} for c in msg["tool_calls"]]
            pending = list(msg["tool_calls"])
            out.append(msg)
            continue
        if msg["role"] != "tool":
            pending = []
            out.append(msg)
            continue
        parts = [msg]
        if len(pending) > 1 and "tool_call_id" not in msg:
            try:
                items = json.loads(msg["content"])
            except json.JSONDecodeError:
                items = None
            if isinstance(items, list) and len(items) == len(pending):
                parts = [{"role": "tool", "content": i if isinstance(i, str) else json.dumps(i, ensure_ascii=False)}
                         for i in items]
        for part in parts:
            call = next((c for c in pending if c["id"] == part.get("tool_call_id")), None)
            if call is None and "tool_call_id" not in part and pending:
                call = pending[0]
            if call is not None:
                pending.remove(call)
                part.setdefault("tool_call_id", call["id"])
                part.setdefault("name", call["function"]["name"])
            out.append(part)
    return out


def tool_stats(samples: list[Any]) -> dict[str, Any]:
    """Counts for `qlocal data check`: records with tools, tool names, calls, parallel turns, results, reasoning."""
    names: list[str] = []
    stats = {"with_tools": 0, "calls": 0, "parallel_turns": 0, "results": 0, "reasoning_turns": 0}
    for s in samples:
        if getattr(s, "tools", None):
            stats["with_tools"] += 1
            names += [t["function"]["name"] for t in s.tools if t["function"]["name"] not in names]
        for m in getattr(s, "messages", []):
            calls = m.get("tool_calls") or []
            stats["calls"] += len(calls)
            stats["parallel_turns"] += len(calls) > 1
            stats["results"] += m["role"] == "tool"
            stats["reasoning_turns"] += bool(m.get("reasoning_content"))
    stats["names"] = names
    return stats
