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
from typing import Any

import pytest

from conftest import MISTRAL_V7_TEMPLATE
from gotemplate_helpers import SHAPES, GoRenderer, go_renderer, jinja_render, to_ollama, with_system  # noqa: F401
from qlocal import chat_families
from qlocal.chat_families import fallbacks
from qlocal.errors import UserError
from qlocal.export.ollama_probes import renders_thinking, renders_tools
from qlocal.export.ollama import (
    build_modelfile,
    ollama_create,
    quote_value,
    render_jinja,
)

FALLBACKS = fallbacks()  # name -> Jinja, from the chat-family table
ASSETS = Path(__file__).parent / "assets" / "tokenizers"
GOLDEN = Path(__file__).parent / "golden"
TOOL_TEMPLATES = Path(__file__).parent / "assets" / "chat_templates"
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
# OLMo 2 Instruct's (Tulu 3) template: eos + newline after an assistant turn, no newline when it is last.
OLMO2 = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
         "{{ '<|system|>\n' + message['content'] + '\n' }}{% elif message['role'] == 'user' %}"
         "{{ '<|user|>\n' + message['content'] + '\n' }}{% elif message['role'] == 'assistant' %}"
         "{% if not loop.last %}{{ '<|assistant|>\n'  + message['content'] + eos_token + '\n' }}"
         "{% else %}{{ '<|assistant|>\n'  + message['content'] + eos_token }}{% endif %}{% endif %}"
         "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}{% endfor %}")
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
    "olmo2": (OLMO2, "<|endoftext|>", "<|endoftext|>", None),
    "mistral-v7": (MISTRAL_V7_TEMPLATE, "<s>", "</s>", None),  # the mistral_nemo fixture's (Small 3)
    "smollm3": ((TOOL_TEMPLATES / "smollm3.jinja").read_text(), None, "<|im_end|>", None),
    # Tool-calling templates of real models (tests/assets/chat_templates, issue 15).
    "qwen2.5-tools": ((TOOL_TEMPLATES / "qwen2.5.jinja").read_text(), None, "<|im_end|>", None),
    "qwen3": ((TOOL_TEMPLATES / "qwen3.jinja").read_text(), None, "<|im_end|>", None),
    "hermes": ((TOOL_TEMPLATES / "hermes.jinja").read_text(), "<|begin_of_text|>", "<|im_end|>", None),
    "llama3.1": ((TOOL_TEMPLATES / "llama3.1.jinja").read_text(), "<|begin_of_text|>", "<|eot_id|>", None),
    "mistral-v3": ((TOOL_TEMPLATES / "mistral.jinja").read_text(), "<s>", "</s>", None),
    "gemma3-own": ((TOOL_TEMPLATES / "gemma3.jinja").read_text(), "<bos>", "<eos>", None),
    # configs/tools_sample.yaml: Gemma 3 270M trained with Hermes 3's tool_use template.
    "gemma3-hermes": ((Path(__file__).parents[1] / "configs" / "hermes_tools.jinja").read_text(), "<bos>", "<eos>",
                      "You call tools."),
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


# Cases whose Modelfile has no TEMPLATE on purpose (test_no_template_cases says why).
NO_TEMPLATE = {"smollm3"}


@pytest.mark.parametrize("name", sorted(set(CASES) - NO_TEMPLATE))
def test_go_template_renders_like_jinja(name: str, go_renderer: GoRenderer) -> None:
    """Ollama's render (Go text/template) of every conversation shape == transformers' Jinja render,
    and Ollama finds in the TEMPLATE the capabilities, tool-call tag and thinking tags the table says."""
    import jinja2

    template, bos, eos, system = CASES[name]
    info = build_modelfile("m.gguf", template, bos, eos, system)
    go = _template_of(info.text)
    shapes = list(SHAPES)
    res = go_renderer.run(go, [{"messages": to_ollama(SHAPES[s][0]), "tools": SHAPES[s][1], "think": SHAPES[s][2]}
                               for s in shapes], info.system or "", chat_template=template)
    assert "messages" in res.vars
    assert res.selected == "go"  # Ollama serves with this TEMPLATE, not the GGUF's Jinja beside it
    fam = chat_families.family(info.family)
    assert ("tools" in res.capabilities) == bool(fam and fam.tool_call_tag), res.capabilities
    assert ("tools" in res.capabilities) == renders_tools(template, bos, eos), f"{name}: tools in Jinja vs TEMPLATE"
    assert ("thinking" in res.capabilities) == renders_thinking(template, bos, eos), name
    if fam and fam.tool_call_tag:
        assert res.tool_tag == fam.tool_call_tag  # what Ollama's tool parser will look for in the output
    assert res.thinking_tags == (fam.thinking_tags if fam and fam.thinking_tags else ("", ""))
    compared = []
    for shape, got, err in zip(shapes, res.renders, res.errors):
        msgs, tools, think = SHAPES[shape]
        if tools and "tools" not in res.capabilities:
            assert err == "does not support tools", (name, shape)  # as the Jinja: no tool support
            continue
        if think and "thinking" not in res.capabilities:
            assert err == "does not support thinking", (name, shape)
            continue
        assert not err, (name, shape, err)
        try:
            want = jinja_render(template, with_system(msgs, system), tools, think, bos, eos)
        except jinja2.TemplateError:  # the template refuses the chat (Llama 3.1: one call per turn)
            continue
        assert got == want, f"{name} / {shape}"
        compared.append(shape)
    assert {"user", "system-user", "multi-turn", "system-multi-turn"} <= set(compared)
    if "tools" in res.capabilities:
        assert "tool-call" in compared
    if "thinking" in res.capabilities:
        assert {"thinking", "no-thinking", "thinking-tool-call"} <= set(compared)


def test_no_template_cases() -> None:
    """SmolLM3's template writes reasoning (/think by default, empty <think> blocks in /no_think turns)
    and a dated metadata system block: no TEMPLATE qlocal has renders it, so Ollama gets none."""
    for name in NO_TEMPLATE:
        info = build_modelfile("m.gguf", *CASES[name])
        assert info.template_source == "gguf" and "reasoning" in info.notes[-1], name
        assert info.stops == ["<|im_end|>"]


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
    assert info.family == "qwen3" and info.stops == ["<|im_end|>"] and info.system is None
    golden = GOLDEN / "qwen3moe.Modelfile"
    if os.environ.get("QLOCAL_UPDATE_GOLDEN") == "1":
        golden.write_text(info.text, encoding="utf-8")
    assert info.text == golden.read_text(encoding="utf-8")
    res = go_renderer.run(_template_of(info.text),
                          [{"messages": to_ollama(SHAPES[s][0]), "tools": None, "think": None} for s in PLAIN_SHAPES])
    for shape, got, err in zip(PLAIN_SHAPES, res.renders, res.errors):
        assert not err, (shape, err)
        assert got == jinja_render(template, SHAPES[shape][0], None, None, None, "<|im_end|>"), shape


def test_tool_family_references_are_the_fixture_templates() -> None:
    """The Jinja each tool family's TEMPLATE is proven against (above) is the one export compares with."""
    fixtures = {"qwen2.5": "qwen2.5", "qwen3": "qwen3", "hermes": "hermes", "llama3.1": "llama3.1",
                "mistral-v3": "mistral"}
    proven = {f.name for f in chat_families.FAMILIES.values() if f.reference}
    assert proven == set(fixtures)
    for fam, fixture in fixtures.items():
        assert chat_families.family(fam).reference == (TOOL_TEMPLATES / f"{fixture}.jinja").read_text()


def test_tool_template_variants() -> None:
    qwen = CASES["qwen2.5-tools"][0]
    # Another default system prompt: still Qwen 2.5's TEMPLATE, the default becomes SYSTEM.
    own = qwen.replace("You are Qwen, created by Alibaba Cloud.", "You are Bob.")
    info = build_modelfile("m.gguf", own, None, "<|im_end|>")
    assert (info.family, info.template_source) == ("qwen2.5", "family")
    assert info.system == "You are Bob. You are a helpful assistant."
    # --system replaces the default: the TEMPLATE stays (Ollama prepends SYSTEM like any system message).
    info = build_modelfile("m.gguf", qwen, None, "<|im_end|>", system="You are a pirate.")
    assert (info.family, info.system) == ("qwen2.5", "You are a pirate.")
    # Tool instructions no proven TEMPLATE says: no TEMPLATE (the GGUF's Jinja serves it), and why.
    odd = qwen.replace("You may call one or more functions", "You may call functions")
    info = build_modelfile("m.gguf", odd, None, "<|im_end|>")
    assert info.template_source == "gguf" and not any(line.startswith("TEMPLATE") for line in info.text.splitlines())
    assert "renders tools or reasoning" in info.notes[-1]
    # An unknown per-role template with a tools block: not derived (that TEMPLATE would drop the tools).
    custom_tools = CUSTOM.replace("{% for m in messages %}", "{% if tools %}<|tools|>{{ tools | tojson }}<|end|>\n"
                                  "{% endif %}{% for m in messages %}")
    assert build_modelfile("m.gguf", CUSTOM, None, "<|end|>").template_source == "derived"
    assert build_modelfile("m.gguf", custom_tools, None, "<|end|>").template_source == "gguf"
    # Qwen3 without its thinking switch renders differently with enable_thinking=False: not Qwen3's.
    no_switch = CASES["qwen3"][0].replace("{%- if enable_thinking is defined and enable_thinking is false %}",
                                          "{%- if false %}")
    assert build_modelfile("m.gguf", no_switch, None, "<|im_end|>").template_source == "gguf"


def _openai_to_ollama(messages: list[dict]) -> list[dict]:
    out = []
    for m in messages:
        o = {"role": m["role"], "content": m.get("content") or ""}
        if m.get("tool_calls"):
            o["tool_calls"] = [{"id": c.get("id", ""), "function": {"index": i, "name": c["function"]["name"],
                                                                    "arguments": c["function"]["arguments"]}}
                               for i, c in enumerate(m["tool_calls"])]
        if m.get("reasoning_content"):
            o["thinking"] = m["reasoning_content"]
        if m["role"] == "tool":
            o["tool_name"], o["tool_call_id"] = m.get("name", ""), m.get("tool_call_id", "")
        out.append(o)
    return out


TOOL_CASES = {"qwen2.5": "qwen2.5-tools", "qwen3": "qwen3", "hermes": "hermes", "llama3.1": "llama3.1",
              "mistral-v3": "mistral-v3"}


@pytest.mark.parametrize("family", sorted(TOOL_CASES))
def test_tool_sample_renders_in_ollama_as_in_training(family: str, go_renderer: GoRenderer) -> None:
    """Every chat of data/tools_sample.jsonl (real schemas, single, parallel and multi-step calls,
    results, reasoning) rendered by Ollama == the training render (qlocal.data.render.chat_inputs).

    No reordering here: the data path already puts schema property names and argument keys in the
    sorted order in which Ollama's Go maps hand them to a TEMPLATE (qlocal.data.tools)."""
    import jinja2
    from transformers.utils.chat_template_utils import render_jinja_template

    from qlocal.data.formats import load_samples
    from qlocal.data.render import chat_inputs

    template, bos, eos, _ = CASES[TOOL_CASES[family]]
    info = build_modelfile("m.gguf", template, bos, eos)
    assert info.family == family
    samples, _ = load_samples(str(Path(__file__).resolve().parents[1] / "data" / "tools_sample.jsonl"))
    requests, wants = [], []
    for s in samples:
        msgs, extra = chat_inputs(s, template)  # reasoning inlined as <think> where the template has none
        try:
            rendered, _ = render_jinja_template(conversations=[msgs], chat_template=template, add_generation_prompt=True,
                                                bos_token=bos or "", eos_token=eos or "", **extra)
        except jinja2.TemplateError:  # Llama 3.1: one call per turn, so no such training chat
            continue
        wants.append(rendered[0][len(bos):] if bos and rendered[0].startswith(bos) else rendered[0])
        think = extra.get("enable_thinking") if chat_families.family(family).thinking_tags else None
        requests.append({"messages": _openai_to_ollama(msgs), "tools": s.tools, "think": think})
    assert len(requests) >= 40
    res = go_renderer.run(_template_of(info.text), requests, info.system or "")
    for i, (got, want, err) in enumerate(zip(res.renders, wants, res.errors)):
        assert not err and got == want, f"{family}: sample chat {i}"


NESTED = [{"type": "function", "function": {
    "name": "book", "description": "Book a table.",
    "parameters": {"type": "object", "properties": {
        "size": {"description": "People or 'large'", "anyOf": [{"type": "integer"}, {"type": "string"}]},
        "where": {"type": "object", "description": "Place", "properties": {
            "city": {"type": "string", "description": "City"}, "zip": {"type": "string"}}, "required": ["city"]}},
        "required": ["where"]}}}]


@pytest.mark.parametrize("name", ["qwen2.5-tools", "qwen3", "hermes", "mistral-v3"])
def test_nested_schema_renders_like_jinja(name: str, go_renderer: GoRenderer) -> None:
    """Object properties with properties/required of their own, and anyOf, print as tojson does.
    (Llama 3.1's indent=4 printer writes flat properties and string arrays only.)"""
    template, bos, eos, _ = CASES[name]
    info = build_modelfile("m.gguf", template, bos, eos)
    chat = [{"role": "user", "content": "A table for 4 in Oslo"}]
    got = go_renderer.render(_template_of(info.text), to_ollama(chat), info.system or "", tools=NESTED)
    assert got == jinja_render(template, with_system(chat, info.system), NESTED, None, bos, eos)
