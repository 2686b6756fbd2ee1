"""Go's own text/template for the Modelfile tests: build tests/gotemplate/main.go, render with it.

The Go program renders a TEMPLATE the way Ollama's server does for /api/chat (see its header).
`go_renderer` (a session fixture) builds it once into a temp dir with the standard library only
(no network, no modules) and skips with a reason when `go` is not on PATH; .ci/run installs Debian's
golang-go. The conversation shapes below are written once in an internal form and converted to
what each side sees: OpenAI-style messages for the Jinja template (as transformers renders them in
training, qlocal.export.ollama_probes) and Ollama /api/chat messages for the Go template.
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

from qlocal.export.ollama_probes import SHAPES, jinja_render, to_jinja, with_system  # noqa: F401

SOURCE = Path(__file__).resolve().parent / "gotemplate" / "main.go"


@dataclass
class GoResult:
    """What Ollama would make of a TEMPLATE: its identifiers, capabilities, tags and renders."""

    vars: list[str]
    capabilities: list[str]
    tool_tag: str
    thinking_tags: tuple[str, str]
    selected: str
    """"go" when Ollama serves with the TEMPLATE, "chat" when it would prefer the GGUF's Jinja."""
    renders: list[str]
    errors: list[str]


class GoRenderer:
    """Runs the built binary on a TEMPLATE and a batch of requests."""

    def __init__(self, binary: Path) -> None:
        self.binary = binary

    def run(self, template: str, requests: list[dict[str, Any]], system: str = "", chat_template: str = "") -> GoResult:
        """Render `requests` ({"messages", "tools", "think"} in Ollama form) with `template`;
        `chat_template` is the GGUF's Jinja, for which of the two Ollama would serve with."""
        payload = json.dumps({"template": template, "system": system, "chat_template": chat_template,
                              "cases": requests})
        done = subprocess.run([str(self.binary)], input=payload, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise AssertionError(f"Go template program failed: {done.stderr.strip()}")
        out = json.loads(done.stdout)
        return GoResult(out["vars"], out["capabilities"] or [], out["tool_tag"], tuple(out["thinking_tags"]),
                        out["selected"], out["renders"], out["errors"])

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

# The shapes, and the Jinja side of each, are the ones export checks a run's template with.
__all__ = ["SHAPES", "jinja_render", "to_jinja", "to_ollama", "with_system", "GoRenderer", "go_renderer"]


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
