"""Chat templates and the token contract: Example(input_ids, loss_mask) from qlocal.data.render."""

from __future__ import annotations

import copy
import os
import unicodedata
from functools import lru_cache
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qlocal.chat_families import fallbacks
from qlocal.data.formats import Sample, load_samples
from qlocal.data.render import Example, render, render_for_display
from qlocal.data.templates import resolve_chat_template
from qlocal.errors import UserError
from render_helpers import trained_spans

FALLBACKS = fallbacks()  # name -> Jinja, from the chat-family table
ASSETS = Path(__file__).resolve().parent / "assets" / "tokenizers"
DATA = Path(__file__).resolve().parent.parent / "data"
NAMES = ["qwen2", "llama3", "gemma3"]
# What each model's own template puts after an assistant's content (and what we train on).
END = {"qwen2": "<|im_end|>\n", "llama3": "<|eot_id|>", "gemma3": "<end_of_turn>\n"}

CONVO = Sample("chat", where="conv.jsonl:7", messages=[
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Japan?"},
    {"role": "assistant", "content": "Tokyo, the capital city."},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You're welcome."},
])
ANSWERS = [m["content"] for m in CONVO.messages if m["role"] == "assistant"]
PROMPTS = [m["content"] for m in CONVO.messages if m["role"] != "assistant"]


@lru_cache(maxsize=None)
def tok(name: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(ASSETS / name))


def untrained_text(ex: Example, t: Any) -> str:
    return t.decode([i for i, m in zip(ex.input_ids, ex.loss_mask) if not m], skip_special_tokens=False)


@pytest.mark.parametrize("name", NAMES)
def test_every_assistant_turn_trained_exactly(name: str) -> None:
    t = tok(name)
    template, label = resolve_chat_template(t, None)
    assert label == "model"
    ex = render(CONVO, t, template)
    assert len(ex.input_ids) == len(ex.loss_mask) and not ex.truncated
    assert trained_spans(ex, t) == [a + END[name] for a in ANSWERS]
    rest = untrained_text(ex, t)
    assert all(p in rest for p in PROMPTS)
    assert not any(a in rest for a in ANSWERS)


@pytest.mark.parametrize("name", NAMES)
def test_bos_exactly_once(name: str) -> None:
    t = tok(name)
    ex = render(CONVO, t, resolve_chat_template(t, None)[0])
    if name == "qwen2":
        assert t.bos_token_id is None
    else:
        assert ex.input_ids[0] == t.bos_token_id and ex.input_ids.count(t.bos_token_id) == 1
        assert ex.loss_mask[0] == 0
    # chatml carries no bos; a model that expects one still gets it, once, untrained.
    ex = render(CONVO, t, FALLBACKS["chatml"])
    if name != "qwen2":
        assert ex.input_ids[0] == t.bos_token_id and ex.input_ids.count(t.bos_token_id) == 1
        assert ex.loss_mask[0] == 0


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("fallback", sorted(FALLBACKS))
def test_fallback_templates_mask_assistant_turns(name: str, fallback: str) -> None:
    t = tok(name)
    template, label = resolve_chat_template(t, fallback)
    assert label == fallback
    ex = render(CONVO, t, template)
    spans = trained_spans(ex, t)
    assert len(spans) == len(ANSWERS)
    for span, answer in zip(spans, ANSWERS):
        assert span.startswith(answer)
        # the end-of-turn marker is trained too, so the model learns to stop
        assert span[len(answer):].strip(), f"{fallback}: no end token trained after {answer!r}"
    assert not any(a in untrained_text(ex, t) for a in ANSWERS)


@pytest.mark.parametrize("name", NAMES)
def test_train_on_prompt(name: str) -> None:
    t = tok(name)
    ex = render(CONVO, t, resolve_chat_template(t, None)[0], train_on_prompt=True)
    if t.bos_token_id is not None:
        assert ex.loss_mask == [0] + [1] * (len(ex.input_ids) - 1)
    else:
        assert ex.loss_mask == [1] * len(ex.input_ids)


@pytest.mark.parametrize("name", NAMES)
def test_truncation(name: str) -> None:
    t = tok(name)
    template = resolve_chat_template(t, None)[0]
    full = render(CONVO, t, template)
    cut = render(CONVO, t, template, max_seq_len=20)
    assert cut.truncated and len(cut.input_ids) == 20 and len(cut.loss_mask) == 20
    assert cut.input_ids == full.input_ids[:20] and cut.loss_mask == full.loss_mask[:20]
    same = render(CONVO, t, template, max_seq_len=len(full.input_ids))
    assert not same.truncated and same == full


@pytest.mark.parametrize("name", NAMES)
def test_text_sample(name: str) -> None:
    t = tok(name)
    ex = render(Sample("text", text="The Sun is a star."), t, "")
    body = t("The Sun is a star.", add_special_tokens=False)["input_ids"]
    if name == "qwen2":
        assert ex.input_ids == body + [t.eos_token_id] and all(ex.loss_mask)
    else:
        assert ex.input_ids == [t.bos_token_id] + body + [t.eos_token_id]
        assert ex.loss_mask == [0] + [1] * (len(body) + 1)


@pytest.mark.parametrize("file", ["alpaca_sample.jsonl", "sharegpt_sample.json", "messages_sample.jsonl",
                                  "completion_sample.jsonl"])
def test_sample_files_render_with_targets(file: str) -> None:
    t = tok("llama3")
    template = resolve_chat_template(t, None)[0]
    samples, _ = load_samples(str(DATA / file))
    for s in samples:
        ex = render(s, t, template)
        assert sum(ex.loss_mask[1:]) > 0, s.where
        answers = [m["content"].strip() for m in s.messages if m["role"] == "assistant"]
        assert [sp.removesuffix("<|eot_id|>") for sp in trained_spans(ex, t)] == answers, s.where


def test_display_markers() -> None:
    t = tok("qwen2")
    shown = render_for_display(render(CONVO, t, resolve_chat_template(t, None)[0]), t)
    assert "[[Paris.<|im_end|>\n]]" in shown and "What is the capital of France?<|im_end|>" in shown
    cut = render_for_display(render(CONVO, t, resolve_chat_template(t, None)[0], max_seq_len=30), t)
    assert cut.endswith("(truncated at max_seq_len)")


def test_resolve_chat_template(tmp_path: Path) -> None:
    t = copy.deepcopy(tok("gemma3"))
    t.chat_template = None
    # No template of its own: the fallback whose markers its vocabulary has (tests/test_new_tokens.py).
    assert resolve_chat_template(t, None) == (FALLBACKS["gemma"], "gemma")
    path = tmp_path / "mine.jinja"
    path.write_text(FALLBACKS["alpaca"], encoding="utf-8")
    assert resolve_chat_template(t, str(path)) == (FALLBACKS["alpaca"], str(path))
    with pytest.raises(UserError, match=r"missing\.jinja: chat template file not found"):
        resolve_chat_template(t, str(tmp_path / "missing.jinja"))
    with pytest.raises(UserError, match="'vicuna' is not known"):
        resolve_chat_template(t, "vicuna")


def test_template_error_names_record() -> None:
    t = tok("gemma3")  # Gemma's template insists on alternating user/assistant turns
    bad = Sample("chat", where="c.jsonl:12", messages=[
        {"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}])
    with pytest.raises(UserError, match=r"c\.jsonl:12: the chat template cannot render .*alternate"):
        render(bad, t, resolve_chat_template(t, None)[0])


def test_non_prefix_stable_template_falls_back_to_sentinels() -> None:
    # Renders a running turn count in every header, so a prefix render never matches the full one.
    # It writes no generation prompt either, so the assistant header is the model's to write and is
    # trained, as with Mistral's templates (data.spans).
    template = ("{% for m in messages %}<{{ m['role'] }} {{ messages | length }}>{{ m['content'] }}"
                "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}")
    t = tok("llama3")
    ex = render(CONVO, t, template)
    assert trained_spans(ex, t) == [f"<assistant 7>{a}<|eot_id|>" for a in ANSWERS]


# ---- property: rendering never crashes and always trains on every answer -----------------------

_chars = st.characters(codec="utf-8", categories=["L", "N", "P", "S", "Zs"], exclude_characters="▁")
_content = st.text(_chars, min_size=1, max_size=40).filter(lambda s: s.strip())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(NAMES), turns=st.lists(st.tuples(_content, _content), min_size=1, max_size=3),
       system=st.one_of(st.none(), _content))
def test_render_property(name: str, turns: list[tuple[str, str]], system: str | None) -> None:
    t = tok(name)
    messages = [{"role": "system", "content": system}] if system else []
    for user, answer in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    ex = render(Sample("chat", messages=messages, where="h:1"), t, resolve_chat_template(t, None)[0])
    assert len(ex.input_ids) == len(ex.loss_mask) and set(ex.loss_mask) <= {0, 1}
    trained = unicodedata.normalize("NFC", "".join(trained_spans(ex, t)))
    for _, answer in turns:
        assert unicodedata.normalize("NFC", answer.strip()) in trained


def test_check_report() -> None:
    from qlocal.config import DataConfig
    from qlocal.data.check import check_report

    t = tok("gemma3")
    report = check_report(str(DATA / "messages_sample.jsonl"), t, resolve_chat_template(t, None)[0],
                          DataConfig(max_seq_len=64))
    assert "40 records (messages: 40)" in report
    assert "input " in report and "trained " in report and "p95" in report
    assert "exceed max_seq_len=64 and will be truncated" in report
    assert "[[" in report and "]]" in report


@pytest.mark.parametrize("name", NAMES)
def test_an_empty_answer_trains_only_the_end_of_turn_and_data_check_warns(name: str, tmp_path: Path) -> None:
    """Why an empty answer is worth a warning: its example still trains the end of turn right after
    the prompt (answer nothing); `qlocal data check` names its file:line."""
    import json

    from qlocal.config import DataConfig
    from qlocal.data.check import check_report

    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ({"instruction": "q", "output": "a"},
                                                           {"instruction": "Say hi.", "output": " "})))
    t = tok(name)
    template = resolve_chat_template(t, None)[0]
    samples, _ = load_samples(str(path))
    trained = "".join(trained_spans(render(samples[1], t, template), t))
    assert trained.strip() == END[name].strip()
    report = check_report(str(path), t, template, DataConfig(max_seq_len=64))
    assert f"  warning: 1 record in {path} has an empty assistant answer ({path}:2); training teaches" in report
