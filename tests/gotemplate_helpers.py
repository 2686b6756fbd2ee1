"""Go's own text/template for the Modelfile tests: build tests/gotemplate/main.go, render with it.

The Go program renders a TEMPLATE the way Ollama's server does for /api/chat (see its header).
`go_renderer` (a session fixture) builds it once into a temp dir with the standard library only
(no network, no modules) and skips with a reason when `go` is not on PATH; .ci/run installs Debian's
golang-go. The conversation shapes below are written once in an internal form and converted to
what each side sees: OpenAI-style messages for the Jinja template (as transformers renders them in
training) and Ollama /api/chat messages for the Go template.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

SOURCE = Path(__file__).resolve().parent / "gotemplate" / "main.go"


@dataclass
class GoResult:
    """What Ollama would make of a TEMPLATE: its identifiers, capabilities, tags and renders."""

    vars: list[str]
    capabilities: list[str]
    tool_tag: str
    thinking_tags: tuple[str, str]
    renders: list[str]
    errors: list[str]


class GoRenderer:
    """Runs the built binary on a TEMPLATE and a batch of requests."""

    def __init__(self, binary: Path) -> None:
        self.binary = binary

    def run(self, template: str, requests: list[dict[str, Any]], system: str = "") -> GoResult:
        """Render `requests` ({"messages", "tools", "think"} in Ollama form) with `template`."""
        payload = json.dumps({"template": template, "system": system, "cases": requests})
        done = subprocess.run([str(self.binary)], input=payload, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise AssertionError(f"Go template program failed: {done.stderr.strip()}")
        out = json.loads(done.stdout)
        return GoResult(out["vars"], out["capabilities"] or [], out["tool_tag"], tuple(out["thinking_tags"]),
                        out["renders"], out["errors"])

    def render(self, template: str, messages: list[dict[str, Any]], system: str = "",
               tools: list[dict[str, Any]] | None = None, think: bool | None = None) -> str:
        """One Ollama-form conversation rendered; a request Ollama would refuse fails the test."""
        res = self.run(template, [{"messages": messages, "tools": tools, "think": think}], system)
        assert not res.errors[0], f"Ollama would refuse this request: {res.errors[0]}"
        return res.renders[0]


@pytest.fixture(scope="session")
def go_renderer(tmp_path_factory: pytest.TempPathFactory) -> GoRenderer:
    """The Go template renderer, built once per session; skips when Go is not installed."""
    go = shutil.which("go")
    if go is None:
        pytest.skip("Go is not installed (Debian: apt-get install golang-go; .ci/run installs it): "
                    "Modelfile TEMPLATEs are checked with Go's own text/template")
    out = tmp_path_factory.mktemp("gotemplate")
    env = {**os.environ, "GOCACHE": str(out / "cache"), "GOPATH": str(out / "gopath"), "GOFLAGS": "",
           "GOTOOLCHAIN": "local", "GOPROXY": "off", "CGO_ENABLED": "0"}
    binary = out / "gotemplate"
    done = subprocess.run([go, "build", "-o", str(binary), str(SOURCE)], cwd=str(SOURCE.parent), env=env,
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise AssertionError(f"go build {SOURCE} failed:\n{done.stderr}")
    return GoRenderer(binary)


# ---------------------------------------------------------------- conversations

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
TOOLS = [WEATHER, TIME]


def call(name: str, args: dict[str, Any], call_id: str) -> dict[str, Any]:
    """An assistant tool call in the internal form (arguments as an object)."""
    return {"id": call_id, "name": name, "arguments": args}


# name -> (messages in the internal form, tools or None, think or None). The internal form:
# {"role", "content", "tool_calls": [call(...)], "thinking": str, "tool_call_id", "name"}.
SHAPES: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]] | None, bool | None]] = {
    "user": ([{"role": "user", "content": "Hi there"}], None, None),
    "system-user": ([{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"}], None, None),
    "multi-turn": ([{"role": "user", "content": "A"}, {"role": "assistant", "content": "B"},
                    {"role": "user", "content": "C"}], None, None),
    "system-multi-turn": ([{"role": "system", "content": "S"}, {"role": "user", "content": "A"},
                           {"role": "assistant", "content": "B"}, {"role": "user", "content": "C"}], None, None),
    "tool-call": ([
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [call("get_weather", {"city": "Paris"}, "call00001")]},
        {"role": "tool", "content": '{"temp": 18, "sky": "clear"}', "tool_call_id": "call00001",
         "name": "get_weather"},
    ], TOOLS, None),
    "parallel-calls": ([
        {"role": "system", "content": "You help travellers."},
        {"role": "user", "content": "Weather and time in Tokyo?"},
        {"role": "assistant", "content": "", "tool_calls": [
            call("get_weather", {"city": "Tokyo", "unit": "celsius"}, "call00001"),
            call("get_time", {"timezone": "Asia/Tokyo"}, "call00002")]},
        {"role": "tool", "content": '{"temp": 21}', "tool_call_id": "call00001", "name": "get_weather"},
        {"role": "tool", "content": '{"time": "09:30"}', "tool_call_id": "call00002", "name": "get_time"},
    ], TOOLS, None),
    "thinking": ([
        {"role": "user", "content": "Is 91 prime?"},
        {"role": "assistant", "content": "No: 91 = 7 x 13.", "thinking": "Try 7: 7 x 13 = 91."},
        {"role": "user", "content": "And 97?"},
    ], None, True),
    "no-thinking": ([{"role": "user", "content": "Is 97 prime?"}], None, False),
}
TOOL_SHAPES = ("tool-call", "parallel-calls")
THINKING_SHAPES = ("thinking", "no-thinking")


def to_jinja(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
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


def to_ollama(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The same conversation as an Ollama /api/chat request carries it."""
    out = []
    for m in messages:
        o: dict[str, Any] = {"role": m["role"], "content": m["content"]}
        if m.get("tool_calls"):
            o["tool_calls"] = [{"id": c["id"], "function": {"index": i, "name": c["name"], "arguments": c["arguments"]}}
                               for i, c in enumerate(m["tool_calls"])]
        if m.get("thinking"):
            o["thinking"] = m["thinking"]
        if m["role"] == "tool":
            o["tool_name"], o["tool_call_id"] = m["name"], m["tool_call_id"]
        out.append(o)
    return out


def jinja_render(template: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                 think: bool | None, bos: str | None, eos: str | None, add_generation_prompt: bool = True) -> str:
    """The Jinja render transformers makes (its sandbox, tojson and reasoning aliases), BOS dropped."""
    from transformers.utils.chat_template_utils import render_jinja_template

    kw: dict[str, Any] = {"bos_token": bos or "", "eos_token": eos or ""}
    if think is not None:
        kw["enable_thinking"] = think
    rendered, _ = render_jinja_template(conversations=[to_jinja(messages)], tools=tools, chat_template=template,
                                        add_generation_prompt=add_generation_prompt, **kw)
    out = rendered[0]
    return out[len(bos):] if bos and out.startswith(bos) else out
