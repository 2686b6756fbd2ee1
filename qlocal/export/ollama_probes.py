"""Probe conversations for the Ollama TEMPLATE: which Go template is faithful to a run's chat template.

Each tool-calling family in qlocal.chat_families carries the Jinja template its Go TEMPLATE was proven
against with Go's own text/template (tests/test_ollama.py, byte for byte, on the shapes below). At
export a run's template gets that TEMPLATE only if it renders exactly like the reference on every
shape (Jinja against Jinja, through transformers' renderer as training does), so the proof carries
over without Go on the exporting machine. `renders_tools` / `renders_thinking` say whether a template
shows tools or reasoning at all: one that does, with no faithful TEMPLATE, gets none (Ollama then
uses the Jinja template stored in the GGUF).

Messages are written once in an internal form: {"role", "content", "tool_calls": [{"id", "name",
"arguments": {...}}], "thinking", "tool_call_id", "name"}; `to_jinja` gives the OpenAI-style form
transformers' apply_chat_template receives. Argument and schema keys are in sorted order because
Ollama hands a template Go maps (ranged in sorted key order): a TEMPLATE can only reproduce those.
"""

from __future__ import annotations

from typing import Any

Messages = list[dict[str, Any]]

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "City name, e.g. Paris"},
        "unit": {"type": "string", "description": "Temperature unit", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Local time in a timezone.",
    "parameters": {"type": "object", "properties": {
        "timezone": {"type": "string", "description": "IANA name"}}, "required": ["timezone"]}}}
INVITE = {"type": "function", "function": {
    "name": "invite", "description": "Invite people to an event.",
    "parameters": {"type": "object", "properties": {
        "emails": {"type": "array", "description": "Who to invite", "items": {"type": "string"}},
        "event_id": {"type": "integer", "description": "The event"}}, "required": ["emails", "event_id"]}}}
TOOLS = [WEATHER, TIME, INVITE]


def _call(name: str, args: dict[str, Any], call_id: str) -> dict[str, Any]:
    return {"id": call_id, "name": name, "arguments": args}


# name -> (messages, tools or None, thinking switch or None): the conversations checked.
SHAPES: dict[str, tuple[Messages, list[dict[str, Any]] | None, bool | None]] = {
    "user": ([{"role": "user", "content": "Hi there"}], None, None),
    "system-user": ([{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"}], None, None),
    "multi-turn": ([{"role": "user", "content": "A"}, {"role": "assistant", "content": "B"},
                    {"role": "user", "content": "C"}], None, None),
    "system-multi-turn": ([{"role": "system", "content": "S"}, {"role": "user", "content": "A"},
                           {"role": "assistant", "content": "B"}, {"role": "user", "content": "C"}], None, None),
    "tool-call": ([
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [_call(
            "get_weather", {"city": "Paris", "days": 3, "options": {"fields": ["temp", "wind"], "hourly": True}},
            "call00001")]},
        {"role": "tool", "content": '{"temp": 18, "sky": "clear"}', "tool_call_id": "call00001",
         "name": "get_weather"},
    ], TOOLS, None),
    "parallel-calls": ([
        {"role": "system", "content": "You help travellers."},
        {"role": "user", "content": "Weather and time in Tokyo?"},
        {"role": "assistant", "content": "", "tool_calls": [
            _call("get_weather", {"city": "Tokyo", "unit": "celsius"}, "call00001"),
            _call("get_time", {"timezone": "Asia/Tokyo"}, "call00002")]},
        {"role": "tool", "content": '{"temp": 21}', "tool_call_id": "call00001", "name": "get_weather"},
        {"role": "tool", "content": '{"time": "09:30"}', "tool_call_id": "call00002", "name": "get_time"},
    ], TOOLS, None),
    "thinking": ([
        {"role": "user", "content": "Is 91 prime?"},
        {"role": "assistant", "content": "No: 91 = 7 x 13.", "thinking": "Try 7: 7 x 13 = 91."},
        {"role": "user", "content": "And 97?"},
    ], None, True),
    "no-thinking": ([{"role": "user", "content": "Is 97 prime?"}], None, False),
    "thinking-tool-call": ([
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "", "thinking": "I should ask the weather tool.",
         "tool_calls": [_call("get_weather", {"city": "Oslo"}, "call00003")]},
        {"role": "tool", "content": '{"temp": -2}', "tool_call_id": "call00003", "name": "get_weather"},
    ], TOOLS, True),
}


def to_jinja(messages: Messages) -> Messages:
    """OpenAI-style messages, as transformers' apply_chat_template receives them in training."""
    out = []
    for m in messages:
        o: dict[str, Any] = {"role": m["role"], "content": m["content"]}
        if m.get("tool_calls"):
            o["tool_calls"] = [{"id": c["id"], "type": "function",
                                "function": {"name": c["name"], "arguments": c["arguments"]}}
                               for c in m["tool_calls"]]
        if m.get("thinking"):
            o["reasoning_content"] = m["thinking"]
        if m["role"] == "tool":
            o["tool_call_id"], o["name"] = m["tool_call_id"], m["name"]
        out.append(o)
    return out


def with_system(messages: Messages, system: str | None) -> Messages:
    """What Ollama renders: the Modelfile SYSTEM leads a chat that has no system message of its own."""
    if system and messages[0]["role"] != "system":
        return [{"role": "system", "content": system}, *messages]
    return messages


def jinja_render(template: str, messages: Messages, tools: list[dict[str, Any]] | None, think: bool | None,
                 bos: str | None, eos: str | None, add_generation_prompt: bool = True) -> str:
    """transformers' render of the chat (its sandbox, tojson and reasoning aliases), BOS dropped.

    A template that loops over `tools` unguarded (Hermes) is rendered with [] for a tool-less chat."""
    import jinja2
    from transformers.utils.chat_template_utils import render_jinja_template

    kw: dict[str, Any] = {"bos_token": bos or "", "eos_token": eos or ""}
    if think is not None:
        kw["enable_thinking"] = think

    def render(tool_list: list[dict[str, Any]] | None) -> str:
        rendered, _ = render_jinja_template(conversations=[to_jinja(messages)], tools=tool_list,
                                            chat_template=template, add_generation_prompt=add_generation_prompt,
                                            **kw)
        return rendered[0]

    try:
        out = render(tools)
    except (TypeError, jinja2.UndefinedError):
        if tools is not None:
            raise
        out = render([])
    return out[len(bos):] if bos and out.startswith(bos) else out


def _try(template: str, shape: str, bos: str | None, eos: str | None, system: str | None = None,
         tools: Any = "shape", think: Any = "shape") -> str | None:
    """The render of one shape, or None where the template refuses it (raise_exception, bad input)."""
    msgs, shape_tools, shape_think = SHAPES[shape]
    try:
        return jinja_render(template, with_system(msgs, system), shape_tools if tools == "shape" else tools,
                            shape_think if think == "shape" else think, bos, eos)
    except Exception:  # noqa: BLE001 - a refusal is an answer: both templates must refuse alike
        return None


def renders_like(template: str, reference: str, bos: str | None, eos: str | None, system: str | None) -> bool:
    """True if `template` with the Modelfile `system` renders every shape exactly as `reference` does,
    and `system` is what the template itself puts first in a chat that has none."""
    for shape in SHAPES:
        mine = _try(template, shape, bos, eos, system)
        if mine != _try(reference, shape, bos, eos, system):
            return False
        if system and mine != _try(template, shape, bos, eos):  # Ollama's SYSTEM == the template's default
            return False
    return True


def renders_tools(template: str, bos: str | None, eos: str | None) -> bool:
    """Whether the template shows tool schemas: a tool chat renders differently with and without them."""
    if "tool" not in template:
        return False
    with_tools = _try(template, "tool-call", bos, eos)
    return with_tools is not None and with_tools != _try(template, "tool-call", bos, eos, tools=None)


def renders_thinking(template: str, bos: str | None, eos: str | None) -> bool:
    """Whether the template shows reasoning or has a thinking switch."""
    if "think" not in template and "reasoning" not in template:
        return False
    shown = _try(template, "thinking-tool-call", bos, eos)
    if shown is not None and SHAPES["thinking-tool-call"][0][1]["thinking"] in shown:
        return True
    return _try(template, "no-thinking", bos, eos) != _try(template, "no-thinking", bos, eos, think=None)
