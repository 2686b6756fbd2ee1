"""Modelfile: golden files per chat family, Go TEMPLATE == Jinja on real chats, quoting, ollama create.

The TEMPLATEs are rendered by Go's own text/template (tests/gotemplate/main.go, which feeds it the
data Ollama's server does: collated .Messages, .Tools, .ToolCalls, .Thinking, SYSTEM prepended) and
compared byte for byte with transformers' Jinja render of the same conversation (BOS excluded:
llama.cpp adds it). Regenerate goldens with QLOCAL_UPDATE_GOLDEN=1 after an intended change, and
review the diff.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest

from qlocal import chat_families
from qlocal.chat_families import fallbacks
from qlocal.errors import UserError
from gotemplate_helpers import SHAPES, GoRenderer, go_renderer, jinja_render, to_ollama  # noqa: F401
from qlocal.export.ollama import (
    build_modelfile,
    ollama_create,
    quote_value,
    render_jinja,
)

FALLBACKS = fallbacks()  # name -> Jinja, from the chat-family table
ASSETS = Path(__file__).parent / "assets" / "tokenizers"
GOLDEN = Path(__file__).parent / "golden"
# Model families' own templates (GGUF families without a tokenizer asset): Granite 3.0 (tools
# branch left out), Phi-3.5-mini and Phi-4-mini, whose `{% else %}{{ eos_token }}` is training-only.
GRANITE = ("{%- for message in messages %}{%- if message['role'] == 'system' %}"
           "{{- '<|start_of_role|>system<|end_of_role|>' + message['content'] + '<|end_of_text|>\\n' }}"
           "{%- elif message['role'] == 'user' %}"
           "{{- '<|start_of_role|>user<|end_of_role|>' + message['content'] + '<|end_of_text|>\\n' }}"
           "{%- elif message['role'] == 'assistant' %}"
           "{{- '<|start_of_role|>assistant<|end_of_role|>' + message['content'] + '<|end_of_text|>\\n' }}"
           "{%- endif %}{%- if loop.last and add_generation_prompt %}"
           "{{- '<|start_of_role|>assistant<|end_of_role|>' }}{%- endif %}{%- endfor %}")
PHI35 = ("{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}"
         "{{'<|system|>\\n' + message['content'] + '<|end|>\\n'}}{% elif message['role'] == 'user' %}"
         "{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}{% elif message['role'] == 'assistant' %}"
         "{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}{% endif %}{% endfor %}"
         "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}")
PHI4_MINI = ("{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
             "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}")
CUSTOM = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")

CASES = {  # golden name -> (template, bos, eos, system)
    "qwen2": ((ASSETS / "qwen2" / "chat_template.jinja").read_text(), None, "<|im_end|>", None),
    "llama3": ((ASSETS / "llama3" / "chat_template.jinja").read_text(), "<|begin_of_text|>", "<|eot_id|>", None),
    "gemma3": ((ASSETS / "gemma3" / "chat_template.jinja").read_text(), "<bos>", "<eos>", None),
    "mistral": (FALLBACKS["mistral"], "<s>", "</s>", None),
    "alpaca": (FALLBACKS["alpaca"], None, "</s>", 'Answer "briefly".\nQuote like """this"""!'),
    "chatml-system": (FALLBACKS["chatml"], None, "<|im_end|>", "You are a pirate.\nSpeak like one."),
    "derived": (CUSTOM, None, "<|end|>", None),
    "granite": (GRANITE, None, "<|end_of_text|>", None),
    "phi3": (PHI35, None, "<|endoftext|>", None),
    "phi4-mini": (PHI4_MINI, None, "<|endoftext|>", None),
}

CHATS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"}],
    [{"role": "user", "content": "A"}, {"role": "assistant", "content": "B"}, {"role": "user", "content": "C"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "A"}, {"role": "assistant", "content": "B"},
     {"role": "user", "content": "C"}],
]


def _template_of(modelfile: str) -> str:
    m = re.search(r'^TEMPLATE """(.*?)"""$', modelfile, re.DOTALL | re.MULTILINE)
    assert m, modelfile
    return m.group(1)


# ---------------------------------------------------------------- tests

@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_modelfiles(name: str) -> None:
    template, bos, eos, system = CASES[name]
    info = build_modelfile("model-q4_k_m.gguf", template, bos, eos, system)
    golden = GOLDEN / f"{name}.Modelfile"
    if os.environ.get("QLOCAL_UPDATE_GOLDEN") == "1":
        golden.write_text(info.text, encoding="utf-8")
    assert info.text == golden.read_text(encoding="utf-8")


def _with_system(messages: list[dict], system: str | None) -> list[dict]:
    """What the model sees in Ollama: the Modelfile SYSTEM leads a chat that has none of its own."""
    if system and messages[0]["role"] != "system":
        return [{"role": "system", "content": system}, *messages]
    return messages


def _jinja_renders_tools(template: str, msgs: list[dict], tools: list[dict], bos: str | None, eos: str | None) -> bool:
    import jinja2

    try:
        return (jinja_render(template, msgs, tools, None, bos, eos)
                != jinja_render(template, msgs, None, None, bos, eos))
    except jinja2.TemplateError:  # e.g. Gemma 3 raises on the tool role: no tool support to lose
        return False


@pytest.mark.parametrize("name", sorted(CASES))
def test_go_template_renders_like_jinja(name: str, go_renderer: GoRenderer) -> None:
    """Ollama's render (Go text/template) of every conversation shape == transformers' Jinja render."""
    template, bos, eos, system = CASES[name]
    info = build_modelfile("m.gguf", template, bos, eos, system)
    go = _template_of(info.text)
    shapes = list(SHAPES)
    res = go_renderer.run(go, [{"messages": to_ollama(SHAPES[s][0]), "tools": SHAPES[s][1], "think": SHAPES[s][2]}
                               for s in shapes], info.system or "")
    assert "messages" in res.vars
    for shape, got, err in zip(shapes, res.renders, res.errors):
        msgs, tools, think = SHAPES[shape]
        if tools and "tools" not in res.capabilities:
            assert err == "does not support tools", (name, shape)
            # A template Ollama calls tool-less must be one whose Jinja ignores tools too (or refuses them).
            assert not _jinja_renders_tools(template, msgs, tools, bos, eos), f"{name}: Jinja renders tools, TEMPLATE not"
            continue
        if think and "thinking" not in res.capabilities:
            assert err == "does not support thinking", (name, shape)
            continue
        assert not err, (name, shape, err)
        want = jinja_render(template, _with_system(msgs, system), tools, think, bos, eos)
        assert got == want, f"{name} / {shape}"


def test_family_detection_and_stops() -> None:
    assert chat_families.detect(CASES["qwen2"][0]).name == "chatml"
    assert chat_families.detect(CASES["llama3"][0]).name == "llama3"
    assert chat_families.detect(CASES["gemma3"][0]).name == "gemma"
    assert chat_families.detect(FALLBACKS["mistral"]).name == "mistral"
    assert chat_families.detect(CUSTOM) is None
    assert build_modelfile("m.gguf", *CASES["gemma3"][:3]).stops == ["<end_of_turn>", "<eos>"]
    derived = build_modelfile("m.gguf", *CASES["derived"][:3])
    assert derived.template_source == "derived" and derived.stops == ["<|end|>"] and derived.notes
    # A template the sentinel round trip cannot reproduce: no TEMPLATE line, a clear note instead.
    odd = "{{ messages | length }}{% for m in messages %}{{ m['content'] | upper }}{% endfor %}"
    info = build_modelfile("m.gguf", odd, None, "</s>")
    assert info.template_source == "gguf"
    assert not any(line.startswith("TEMPLATE") for line in info.text.splitlines())


def test_adapter_line_and_default_system() -> None:
    info = build_modelfile("base-f16.gguf", *CASES["qwen2"][:3], adapter_file="adapter.gguf")
    lines = info.text.splitlines()
    assert lines[1] == "FROM ./base-f16.gguf" and lines[2] == "ADAPTER ./adapter.gguf"
    assert info.system.startswith("You are Qwen")  # the template's own default becomes SYSTEM
    assert build_modelfile("m.gguf", *CASES["qwen2"][:3], system="Hi").system == "Hi"


def test_quote_value() -> None:
    assert quote_value('say "hi"', "x") == '"""say "hi""""'
    assert quote_value('a"""b', "x") == '"a"""b"'
    with pytest.raises(UserError, match="no escape"):
        quote_value('a """ b', "the system prompt")


def test_ollama_create_prints_command_without_ollama(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    shown: list[str] = []
    assert ollama_create("my-model", tmp_path, shown.append) is False
    assert f"cd {tmp_path} && ollama create my-model -f Modelfile" in shown[0]


def test_ollama_create_runs_ollama_when_present(tmp_path: Path, monkeypatch) -> None:
    fake = tmp_path / "bin" / "ollama"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\necho \"$@\" > {shlex.quote(str(tmp_path / 'args'))}\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(fake.parent))
    assert ollama_create("my-model", tmp_path, print) is True
    assert (tmp_path / "args").read_text().split() == ["create", "my-model", "-f", "Modelfile"]


PLAIN_SHAPES = ("user", "system-user", "multi-turn", "system-multi-turn")


def test_qwen3moe_modelfile(go_renderer: GoRenderer) -> None:
    """Qwen3-MoE (Qwen3-30B-A3B, 235B-A22B) ships Qwen3's own template byte for byte: its Modelfile is
    golden, and Ollama renders plain chats (system, multi-turn) exactly as that Jinja does. The
    tools and thinking shapes are Qwen3's template's, covered with the tool-capable templates."""
    template = (Path(__file__).parent / "assets" / "chat_templates" / "qwen3.jinja").read_text()
    info = build_modelfile("model-q4_k_m.gguf", template, None, "<|im_end|>", None)
    assert info.family == "chatml" and info.stops == ["<|im_end|>"] and info.system is None
    golden = GOLDEN / "qwen3moe.Modelfile"
    if os.environ.get("QLOCAL_UPDATE_GOLDEN") == "1":
        golden.write_text(info.text, encoding="utf-8")
    assert info.text == golden.read_text(encoding="utf-8")
    res = go_renderer.run(_template_of(info.text),
                          [{"messages": to_ollama(SHAPES[s][0]), "tools": None, "think": None} for s in PLAIN_SHAPES])
    for shape, got, err in zip(PLAIN_SHAPES, res.renders, res.errors):
        assert not err, (shape, err)
        assert got == jinja_render(template, SHAPES[shape][0], None, None, None, "<|im_end|>"), shape
