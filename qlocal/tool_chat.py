"""Tools in `qlocal chat` and `qlocal generate` (issue 15): the --tools file, and one assistant turn
streamed with its calls split out by the template's own tag (qlocal.tool_calls, Ollama's rule).

A generator here is anything with `chat(messages, sampling, tools=None)` streaming text and a
`template` (the Jinja it renders with): qlocal.infer's run, HF-model and GGUF generators.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TextIO

from qlocal.errors import UserError
from qlocal.tool_calls import StreamParser, check_tools, new_call_id, template_tag


def load_tools(path: str, option: str = "--tools") -> list[dict]:
    """The function schemas of a JSON file: a list of them, or {"tools": [...]}."""
    fix = 'write a JSON list of {"type": "function", "function": {"name", "description", "parameters"}}'
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{option} {path}: no such file; {fix}")
    try:
        tools = check_tools(json.loads(p.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{option} {path}: not valid UTF-8 JSON ({e}); {fix}") from None
    except ValueError as e:
        raise UserError(f"{option} {path}: {e}; {fix}") from None
    if not tools:
        raise UserError(f"{option} {path}: holds no function schemas; {fix}")
    return tools


def tool_tag(gen: Any, tools: list[dict] | None, where: str) -> str | None:
    """The call tag of the generator's template; an error when tools are given to a template that
    has no tool-call format (its render would drop them)."""
    if not tools:
        return None
    tag = template_tag(getattr(gen, "template", None))
    if tag is None:
        raise UserError(f"{where}: the chat template never renders tool calls, so the model cannot call the tools; "
                        "use a run trained with a tool-capable template (e.g. Qwen 2.5, Hermes, Llama 3.1)")
    return tag


def show_call(call: dict) -> str:
    """One call as chat prints it: name and JSON arguments."""
    fn = call["function"]
    return f"[tool call] {fn['name']} {json.dumps(fn['arguments'], ensure_ascii=False)}"


def assistant_turn(gen: Any, messages: list[dict], sampling: Any, tools: list[dict] | None, tag: str | None,
                   out: TextIO | None = None) -> dict:
    """Generate one assistant message for `messages`: content streamed to `out` as it comes (call
    text held back), calls each printed once complete. Returns the message in the internal form
    (content, and tool_calls with ids when there are any)."""
    parser = StreamParser(tag, tools, keep_broken=True)  # a call that does not parse is shown as written
    content: list[str] = []
    calls: list[dict] = []

    line_start = True

    def take(step: tuple[str, list[dict]]) -> None:
        nonlocal line_start
        text, done = step
        content.append(text)
        calls.extend(done)
        if out is None:
            return
        if text:
            out.write(text)
            line_start = text.endswith("\n")
        for c in done:
            out.write(("" if line_start else "\n") + show_call(c) + "\n")
            line_start = True
        out.flush()

    stream = gen.chat(messages, sampling, tools=tools) if tools else gen.chat(messages, sampling)
    for piece in stream:
        take(parser.feed(piece))
    take(parser.finish())
    msg: dict[str, Any] = {"role": "assistant", "content": "".join(content)}
    if calls:
        msg["content"] = msg["content"].strip()
        msg["tool_calls"] = [{"id": new_call_id(), **c} for c in calls]
    return msg
