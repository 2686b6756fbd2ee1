"""Modelfile: golden files per chat family, Go TEMPLATE == Jinja on real chats, quoting, ollama create.

The Go templates are checked by rendering them with a small interpreter for the subset of Go's
text/template they use (range/if/else/end, eq/and/not, variables, {{- -}} trimming) and comparing
with the Jinja original on several conversations (BOS excluded: llama.cpp adds it).
Regenerate goldens with QLOCAL_UPDATE_GOLDEN=1 after an intended change, and review the diff.
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


# ---------------------------------------------------------------- a tiny Go text/template interpreter

_ACTION = re.compile(r"\{\{(-?)(.*?)(-?)\}\}", re.DOTALL)


def go_render(template: str, messages: list[dict[str, str]], system: str = "") -> str:
    parts: list[tuple[str, str]] = []
    pos = 0
    for m in _ACTION.finditer(template):
        text = template[pos:m.start()]
        if m.group(1):
            text = text.rstrip(" \t\r\n")
        parts.append(("text", text))
        parts.append(("act", m.group(2).strip()))
        pos = m.end()
        if m.group(3):
            rest = template[pos:]
            pos += len(rest) - len(rest.lstrip(" \t\r\n"))
    parts.append(("text", template[pos:]))
    tree, _ = _parse(parts, 0)
    out: list[str] = []
    _run(tree, {"$": {"Messages": messages, "System": system}}, {"Messages": messages}, out)
    return "".join(out)


def _parse(parts, i):
    nodes = []
    while i < len(parts):
        kind, val = parts[i]
        if kind == "text":
            nodes.append(("text", val))
            i += 1
        elif val.startswith("range "):
            body, i = _parse(parts, i + 1)
            nodes.append(("range", val[6:].strip(), body))
        elif val.startswith("if "):
            branches = []
            cond = val[3:]
            while True:
                body, i = _parse(parts, i + 1)
                branches.append((cond, body))
                end = parts[i][1]
                if end == "end":
                    break
                cond = end[len("else if "):] if end.startswith("else if ") else "true"
            nodes.append(("if", branches))
            i += 1
            continue
        elif val == "end" or val == "else" or val.startswith("else if "):
            return nodes, i
        else:
            nodes.append(("expr", val))
            i += 1
            continue
        if nodes[-1][0] == "range":
            i += 1
    return nodes, i


def _value(tok: str, vars_: dict, dot: dict):
    if tok.startswith('"'):
        return tok[1:-1]
    if tok in ("true", "false"):
        return tok == "true"
    if tok.startswith("$"):
        return vars_[tok]
    if tok.startswith("."):
        return dot[tok[1:]]
    raise ValueError(tok)


def _eval(expr: str, vars_: dict, dot: dict):
    toks = re.findall(r'"[^"]*"|\S+', expr)
    if toks[0] == "eq":
        return _value(toks[1], vars_, dot) == _value(toks[2], vars_, dot)
    if toks[0] == "and":
        return all(_value(t, vars_, dot) for t in toks[1:])
    if toks[0] == "not":
        return not _value(toks[1], vars_, dot)
    return _value(toks[0], vars_, dot)


def _run(nodes, vars_, dot, out):
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "range":
            for item in _value(node[1], vars_, dot):
                _run(node[2], vars_, {"Role": item["role"], "Content": item["content"]}, out)
        elif node[0] == "if":
            for cond, body in node[1]:
                if cond == "true" or _eval(cond, vars_, dot):
                    _run(body, vars_, dot, out)
                    break
        else:
            m = re.match(r"(\$\w+)\s*(:?=)\s*(.+)", node[1])
            if m:
                vars_[m.group(1)] = _eval(m.group(3), vars_, dot)
            else:
                v = _eval(node[1], vars_, dot)
                out.append("" if v is False or v is None else str(v))


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


@pytest.mark.parametrize("name", ["qwen2", "llama3", "gemma3", "mistral", "alpaca", "derived", "granite", "phi3",
                                  "phi4-mini"])
def test_go_template_renders_like_jinja(name: str) -> None:
    template, bos, eos, _ = CASES[name]
    info = build_modelfile("m.gguf", template, bos, eos)
    go = _template_of(info.text)
    for chat in CHATS:
        if name in ("gemma3",) and chat[-1]["role"] != "user":
            continue
        msgs = chat
        if info.system and chat[0]["role"] != "system":  # Ollama prepends SYSTEM when the chat has none
            msgs = [{"role": "system", "content": info.system}, *chat]
        want = render_jinja(template, chat, name != "mistral", bos, eos)
        if bos and want.startswith(bos):
            want = want[len(bos):]
        got = go_render(go, msgs)
        assert got == want, f"{name}: {chat}"


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
