"""Adding a chat family is one entry in qlocal.chat_families: every reader picks it up from there.

A made-up format (`<|turn|>role\\n ... <|stop|>`) is registered only in the table (monkeypatch), and
a tiny tokenizer built here carries its markers as special tokens. `<|stop|>` matches none of the
name patterns render.py guesses end tokens by, so each check below passes only through the table.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from qlocal import chat_families
from qlocal.chat_families import ChatFamily
from qlocal.data.formats import Sample
from qlocal.data.render import render
from qlocal.data.templates import resolve_chat_template
from qlocal.errors import UserError
from qlocal.export.ollama import build_modelfile, render_jinja
from qlocal.infer import stop_token_ids
from render_helpers import trained_spans
from gotemplate_helpers import GoRenderer, go_renderer  # noqa: F401
from test_ollama import CHATS

ASSETS = Path(__file__).resolve().parent / "assets"

TURN = ChatFamily(
    name="turn", marker="<|turn|>", end_of_turn=("<|stop|>",),
    jinja=(
        "{%- for message in messages %}"
        "{{- '<|turn|>' + message['role'] + '\\n' + message['content'] + '<|stop|>\\n' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|turn|>assistant\\n' }}{%- endif %}"
    ),
    go_template="{{- range .Messages }}<|turn|>{{ .Role }}\n{{ .Content }}<|stop|>\n{{ end }}<|turn|>assistant\n",
)

# The assistant speaks first, so render must find that turn's end by its end-of-turn token (there is
# no prompt before it to diff against); the later turns are found by the prefix method.
CONVO = Sample("chat", where="turn.jsonl:1", messages=[
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Japan?"},
    {"role": "assistant", "content": "Tokyo."},
])
ANSWERS = [m["content"] for m in CONVO.messages if m["role"] == "assistant"]


@pytest.fixture
def turn(monkeypatch: pytest.MonkeyPatch) -> ChatFamily:
    monkeypatch.setitem(chat_families.FAMILIES, TURN.name, TURN)
    return TURN


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE tokenizer with <|turn|> and <|stop|> as special tokens, eos <|endoftext|>."""
    pytest.importorskip("transformers")
    spec = importlib.util.spec_from_file_location("make_tokenizers", ASSETS / "make_tokenizers.py")
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|turn|>", "<|stop|>"]
    fast = PreTrainedTokenizerFast(tokenizer_object=make.byte_level(make.QWEN_PATTERN, specials, 400),
                                   eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=specials[1:])
    out = tmp_path_factory.mktemp("turn-tokenizer")
    fast.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def tok(tok_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tok_dir))


def test_chat_template_name_renders_and_masks_only_assistant_turns(turn: ChatFamily, tok: Any) -> None:
    template, label = resolve_chat_template(tok, "turn")  # what --chat-template turn resolves to
    assert (template, label) == (turn.jinja, "turn")
    ex = render(CONVO, tok, template)
    # The first span is found by content + end-of-turn token, the later ones by the prefix method
    # (which also takes the newline the template writes after <|stop|>).
    assert trained_spans(ex, tok) == [ANSWERS[0] + "<|stop|>", ANSWERS[1] + "<|stop|>\n", ANSWERS[2] + "<|stop|>\n"]
    untrained = tok.decode([i for i, m in zip(ex.input_ids, ex.loss_mask) if not m], skip_special_tokens=False)
    assert "What is the capital of France?" in untrained and "And of Japan?" in untrained
    assert "<|turn|>assistant" in untrained and not any(a in untrained for a in ANSWERS)
    with pytest.raises(UserError, match=r"chatml\|llama3\|gemma\|mistral\|alpaca\|turn or a \.jinja"):
        resolve_chat_template(tok, "nope")


def test_render_end_token_comes_from_the_table(tok: Any) -> None:
    # Same template, family not registered: the first turn's <|stop|> is not known as an end.
    ex = render(CONVO, tok, TURN.jinja)
    assert trained_spans(ex, tok)[0] == ANSWERS[0]


def test_modelfile_template_and_stops(turn: ChatFamily) -> None:
    info = build_modelfile("m.gguf", turn.jinja, None, "<|endoftext|>")
    assert (info.family, info.template_source) == ("turn", "family")
    assert f'TEMPLATE """{turn.go_template}"""' in info.text
    assert info.stops == ["<|stop|>", "<|endoftext|>"]
    assert [line for line in info.text.splitlines() if line.startswith("PARAMETER stop")] == [
        'PARAMETER stop "<|stop|>"', 'PARAMETER stop "<|endoftext|>"']


def test_go_template_says_what_the_jinja_says(turn: ChatFamily, go_renderer: GoRenderer) -> None:
    for chat in CHATS:  # rendered by Go's text/template as Ollama does
        assert go_renderer.render(turn.go_template, chat) == render_jinja(turn.jinja, chat, True)


def test_stop_token_ids_include_the_end_token(turn: ChatFamily, tok: Any) -> None:
    vocab = tok.get_vocab()
    assert stop_token_ids(tok, turn.jinja) == sorted({vocab["<|stop|>"], tok.eos_token_id})


def test_gguf_eot_is_the_families_end_token(turn: ChatFamily, tok_dir: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("gguf")
    from gguf import GGUFWriter

    from qlocal.export.gguf_vocab import write_vocab

    info = write_vocab(GGUFWriter(str(tmp_path / "v.gguf"), "qwen2"), tok_dir, None)
    assert info.special_ids["eot"] != info.special_ids["eos"]
    assert info.special_ids["eot"] == _id(tok_dir, "<|stop|>")
    monkeypatch.delitem(chat_families.FAMILIES, turn.name)
    info = write_vocab(GGUFWriter(str(tmp_path / "w.gguf"), "qwen2"), tok_dir, None)
    assert "eot" not in info.special_ids  # without the entry nothing else names <|stop|>


def _id(tok_dir: Path, token: str) -> int:
    added = json.loads((tok_dir / "tokenizer.json").read_text())["added_tokens"]
    return next(a["id"] for a in added if a["content"] == token)
