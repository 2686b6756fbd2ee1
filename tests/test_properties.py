"""Property-based tests (hypothesis) on format detection and rendering.

- any JSON-shaped record either normalises or raises UserError: never another exception;
- masks cover exactly the assistant contents and their end-of-turn tokens;
- token ids decode back to the rendered text.
"""

from __future__ import annotations

import unicodedata
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qlocal.data.formats import Sample, detect_format, normalise
from qlocal.data.render import render
from qlocal.data.templates import resolve_chat_template
from qlocal.errors import UserError
from render_helpers import trained_spans

ASSETS = Path(__file__).resolve().parent / "assets" / "tokenizers"
END = {"qwen2": "<|im_end|>\n", "llama3": "<|eot_id|>", "gemma3": "<end_of_turn>\n"}

_json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=12))
_json = st.recursive(_json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                         st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                     max_leaves=8)
_KEYS = ["instruction", "input", "output", "system", "history", "conversations", "from", "value", "messages",
         "role", "content", "prompt", "completion", "text"]
_record = st.dictionaries(st.sampled_from(_KEYS), _json, max_size=4)
_turn = st.dictionaries(st.sampled_from(["role", "content", "from", "value"]),
                        st.one_of(st.sampled_from(["user", "assistant", "system", "human", "gpt", "tool"]), _json),
                        max_size=3)
_conversation = st.fixed_dictionaries({"messages": st.lists(_turn, max_size=4)})


@settings(max_examples=300, deadline=None)
@given(record=st.one_of(_record, _conversation))
def test_detect_and_normalise_only_raise_user_errors(record: dict) -> None:
    fmt = detect_format(record)
    if fmt is None:
        return
    try:
        sample = normalise(record, fmt, "f.jsonl:1")
    except UserError as e:
        assert "f.jsonl:1" in str(e)
        return
    assert sample.kind in ("chat", "text")
    if sample.kind == "chat":
        assert any(m["role"] == "assistant" for m in sample.messages)
        assert all(isinstance(m["content"], str) for m in sample.messages)


@lru_cache(maxsize=None)
def _tok(name: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(ASSETS / name))


# Text the tokenizers round-trip (no NUL/control characters, no SentencePiece's own ▁) and that a
# template does not rewrite (no leading/trailing whitespace: several templates trim contents).
_chars = st.characters(codec="utf-8", categories=["L", "N", "P", "S", "Zs"], exclude_characters="▁")
_content = st.text(_chars, min_size=1, max_size=30).map(str.strip).filter(bool)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(sorted(END)), turns=st.lists(st.tuples(_content, _content), min_size=1, max_size=3),
       system=st.one_of(st.none(), _content))
def test_mask_is_exactly_the_assistant_turns_and_ids_decode_to_the_text(
        name: str, turns: list[tuple[str, str]], system: str | None) -> None:
    t = _tok(name)
    messages = ([{"role": "system", "content": system}] if system else [])
    for user, answer in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    template = resolve_chat_template(t, None)[0]
    ex = render(Sample("chat", messages=messages, where="p:1"), t, template)

    nfc = lambda s: unicodedata.normalize("NFC", s)  # noqa: E731
    assert [nfc(s) for s in trained_spans(ex, t)] == [nfc(a + END[name]) for _, a in turns]
    rendered = t.apply_chat_template(messages, chat_template=template, tokenize=False)
    assert nfc(t.decode(ex.input_ids, skip_special_tokens=False)) == nfc(rendered)


@pytest.mark.parametrize("name", sorted(END))
def test_text_samples_train_every_token_after_bos(name: str) -> None:
    t = _tok(name)
    ex = render(Sample("text", text="Plain text for continued pre-training."), t, resolve_chat_template(t, "chatml")[0])
    first = 1 if t.bos_token_id is not None and ex.input_ids[0] == t.bos_token_id else 0
    assert ex.loss_mask[:first] == [0] * first and all(ex.loss_mask[first:])
