"""Preference data contract (qlocal.data.preference): rendering pairs and KTO answers, truncation,
collation, and the preference config section against TRL's defaults."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest

from qlocal import config as config_mod
from qlocal.data.formats import Sample
from qlocal.data.preference import (KTOExample, KTOSample, PairExample, PairSample, assign_kl, collate_kto,
                                    collate_pairs, render_kto, render_pair)
from qlocal.data.render import render
from qlocal.errors import UserError

TEMPLATES = Path(__file__).resolve().parent / "assets" / "chat_templates"
# (tokenizer asset, template file): every real template shipped with the tests.
CASES = [("qwen2", "qwen2.5.jinja"), ("qwen2", "qwen3.jinja"),
         ("llama3", "llama3.1.jinja"), ("llama3", "smollm3.jinja"), ("gemma3", "gemma3.jinja"),
         ("gemma3", "mistral.jinja")]

PROMPT = [{"role": "system", "content": "Answer in one short sentence."},
          {"role": "user", "content": "Why is the sky blue?"}]
GOOD = [{"role": "assistant", "content": "Air scatters blue light the most."}]
BAD = [{"role": "assistant", "content": "Well, that is a long story involving physics, the sun and much more."}]


def _tok(tokenizer_dir: Any, name: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir(name)))


def _template(name: str) -> str:
    return (TEMPLATES / name).read_text(encoding="utf-8")


def _decode(tok: Any, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize("tok_name,template_name", CASES)
def test_pair_shares_prompt_and_scores_the_answer(tokenizer_dir: Any, tok_name: str, template_name: str) -> None:
    tok, template = _tok(tokenizer_dir, tok_name), _template(template_name)
    ex = render_pair(PairSample(PROMPT, GOOD, BAD, "f:1"), tok, template)
    # The shared prompt is exactly what inference feeds the model: the template's generation prompt.
    # (qlocal turns a template's thinking switch off for data that does not think.)
    switch = {"enable_thinking": False} if "enable_thinking" in template else {}
    gen = tok.apply_chat_template(PROMPT, chat_template=template, tokenize=False, add_generation_prompt=True, **switch)
    assert _decode(tok, ex.prompt_ids).endswith(gen.removeprefix(tok.bos_token or ""))
    for ids, mask, msg in ((ex.chosen_ids, ex.chosen_mask, GOOD), (ex.rejected_ids, ex.rejected_mask, BAD)):
        assert len(ids) == len(mask) and all(mask)  # one assistant turn: every answer token is scored
        text = _decode(tok, ids)
        assert text.strip().startswith(msg[0]["content"]) or msg[0]["content"] in text
        assert tok.convert_ids_to_tokens(ids[-1]) in {tok.eos_token, "<|im_end|>", "<|eot_id|>", "<end_of_turn>", "\n", "Ċ"}
    # Where the template is prefix-stable, prompt + chosen is the SFT render of the whole chat, and
    # its scored tokens are the SFT targets.
    if not ex.split_render:
        sft = render(Sample("chat", PROMPT + GOOD, where="f:1"), tok, template)
        row, _ = ex.rows()
        n = len(row.input_ids)
        assert sft.input_ids[:n] == row.input_ids
        assert sft.loss_mask[:n] == row.loss_mask and not any(sft.loss_mask[n:])


def test_template_not_prefix_stable_uses_the_inference_prompt(tokenizer_dir: Any) -> None:
    # This Mistral template writes the system prompt into the last user turn only when that turn is
    # the last message: the training render of prompt + answer has no system prompt at all.
    tok, template = _tok(tokenizer_dir, "gemma3"), _template("mistral.jinja")
    ex = render_pair(PairSample(PROMPT, GOOD, BAD, "f:1"), tok, template)
    assert ex.split_render == 2
    assert "one short sentence" in _decode(tok, ex.prompt_ids)
    assert _decode(tok, ex.chosen_ids) == GOOD[0]["content"] + tok.eos_token


def test_multi_turn_prompt_and_tool_result_inside_an_answer(tokenizer_dir: Any) -> None:
    tok, template = _tok(tokenizer_dir, "qwen2"), _template("qwen2.5.jinja")
    prompt = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, how can I help?"},
              {"role": "user", "content": "Weather in Oslo?"}]
    call = {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}}}]}
    chosen = [call, {"role": "tool", "content": "rain, 7C"}, {"role": "assistant", "content": "Rainy, 7C."}]
    rejected = [{"role": "assistant", "content": "I cannot know that."}]
    tools = [{"type": "function", "function": {"name": "weather", "description": "Weather of a city",
                                               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    ex = render_pair(PairSample(prompt, chosen, rejected, "f:2", tools), tok, template)
    # The earlier assistant turn is prompt, never scored; the tool result inside the answer is not scored.
    assert "Hello, how can I help?" in _decode(tok, ex.prompt_ids)
    scored = _decode(tok, [t for t, m in zip(ex.chosen_ids, ex.chosen_mask) if m])
    unscored = _decode(tok, [t for t, m in zip(ex.chosen_ids, ex.chosen_mask) if not m])
    assert "weather" in scored and "Rainy, 7C." in scored and "rain, 7C" in unscored
    assert ex.split_render == 0


def test_thinking_answers_share_the_prompt(tokenizer_dir: Any) -> None:
    # Qwen3 closes the generation prompt with an empty think block only when thinking is off; with
    # one side thinking the prompt must end before it, so both sides start at the same token.
    tok, template = _tok(tokenizer_dir, "qwen2"), _template("qwen3.jinja")
    chosen = [{"role": "assistant", "content": "4", "reasoning_content": "2 + 2 = 4"}]
    rejected = [{"role": "assistant", "content": "5"}]
    ex = render_pair(PairSample([{"role": "user", "content": "2+2?"}], chosen, rejected, "f:3"), tok, template)
    assert ex.split_render == 0
    assert _decode(tok, ex.prompt_ids).endswith("<|im_start|>assistant\n")
    assert _decode(tok, ex.chosen_ids).startswith("<think>\n2 + 2 = 4\n</think>")
    assert _decode(tok, ex.rejected_ids).startswith("<think>\n\n</think>")


def test_identical_sides_and_empty_answer_are_errors(tokenizer_dir: Any) -> None:
    tok, template = _tok(tokenizer_dir, "qwen2"), _template("qwen2.5.jinja")
    same = [{"role": "assistant", "content": " Air scatters blue light the most."}]  # the template trims? no: differs
    with pytest.raises(UserError, match=r"f:4: 'chosen' and 'rejected' render to the same tokens"):
        render_pair(PairSample(PROMPT, GOOD, [dict(GOOD[0])], "f:4"), tok, template)
    render_pair(PairSample(PROMPT, GOOD, same, "f:4"), tok, template)  # a leading space is a different answer


def test_truncation_keeps_prompt_end_and_answer_start(tokenizer_dir: Any) -> None:
    tok, template = _tok(tokenizer_dir, "llama3"), _template("llama3.1.jinja")
    long_prompt = [{"role": "user", "content": " ".join(f"word{i}" for i in range(200))}]
    long_answer = [{"role": "assistant", "content": " ".join(f"reply{i}" for i in range(200))}]
    full = render_pair(PairSample(long_prompt, long_answer, GOOD, "f:5"), tok, template)
    cut = render_pair(PairSample(long_prompt, long_answer, GOOD, "f:5"), tok, template, max_seq_len=100)
    assert not full.truncated and cut.truncated
    assert len(cut.prompt_ids) + len(cut.chosen_ids) == 100 and len(cut.prompt_ids) == 50  # half the budget
    assert cut.prompt_ids[0] == tok.bos_token_id and cut.prompt_ids[1:] == full.prompt_ids[-49:]
    assert cut.chosen_ids == full.chosen_ids[:50] and cut.chosen_mask == full.chosen_mask[:50]
    assert cut.rejected_ids == full.rejected_ids  # the short side fits whole
    # A prompt under half the budget stays whole and the answers get the rest.
    go = PairSample([{"role": "user", "content": "Go"}], long_answer, GOOD, "f:6")
    whole, short = render_pair(go, tok, template), render_pair(go, tok, template, max_seq_len=200)
    assert len(whole.prompt_ids) < 100 and short.prompt_ids == whole.prompt_ids
    assert short.truncated and short.chosen_ids == whole.chosen_ids[:200 - len(whole.prompt_ids)]


def test_collate_pairs_rows_masks_and_refs() -> None:
    a = PairExample([1, 2, 3], [4, 5], [6], [1, 1], [1])
    b = PairExample([7], [8, 9, 10], [11, 12], [1, 0, 1], [1, 1])
    batch = collate_pairs([a, b], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [7, 8, 9, 10, 0], [1, 2, 3, 6, 0], [7, 11, 12, 0, 0]]
    assert batch["loss_mask"].tolist() == [[0, 0, 0, 1, 1], [0, 1, 0, 1, 0], [0, 0, 0, 1, 0], [0, 1, 1, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]
    assert batch["chosen"].tolist() == [1, 1, 0, 0] and "ref_logp" not in batch
    assert a.length == 5 and b.length == 4
    a.ref_chosen, a.ref_rejected, b.ref_chosen, b.ref_rejected = -1.0, -2.0, -3.0, -4.0
    assert collate_pairs([a, b], 0)["ref_logp"].tolist() == [-1.0, -3.0, -2.0, -4.0]
    b.ref_rejected = None
    with pytest.raises(ValueError, match="precompute all or none"):
        collate_pairs([a, b], 0)


def test_kto_render_kl_rotation_and_collate(tokenizer_dir: Any) -> None:
    tok, template = _tok(tokenizer_dir, "qwen2"), _template("qwen2.5.jinja")
    ex = render_kto(KTOSample(PROMPT, GOOD, False, "f:7"), tok, template)
    pair = render_pair(PairSample(PROMPT, GOOD, BAD, "f:7"), tok, template)
    assert (ex.prompt_ids, ex.completion_ids, ex.completion_mask) == (pair.prompt_ids, pair.chosen_ids, pair.chosen_mask)
    examples = [KTOExample([i], [10 + i, 20 + i], [1, 1], label=i % 2 == 0) for i in range(5)]
    assign_kl(examples, batch_size=2)
    # TRL's rotation within groups of the batch size: (x1, y2), (x2, y1) | (x3, y4), (x4, y3) | (x5, y5)
    assert [e.kl_completion_ids[0] for e in examples] == [11, 10, 13, 12, 14]
    batch = collate_kto(examples[:2], pad_id=0)
    assert batch["input_ids"].tolist() == [[0, 10, 20], [1, 11, 21], [0, 11, 21], [1, 10, 20]]
    assert batch["loss_mask"].tolist() == [[0, 1, 1]] * 4
    assert batch["label"].tolist() == [1, 0, 1, 0] and batch["kl"].tolist() == [0, 0, 1, 1]
    plain = collate_kto([KTOExample([1], [2], [1], True)], pad_id=0)
    assert plain["kl"].tolist() == [0] and plain["input_ids"].shape == (1, 2)
    long = [KTOExample([1, 2, 3], [4], [1], True), KTOExample([5], [6, 7, 8, 9], [1, 1, 1, 1], False)]
    assign_kl(long, batch_size=2, max_seq_len=5)
    assert long[0].kl_completion_ids == [6, 7]  # cut to fit after its 3-token prompt


def _defaults(cls: Any) -> Any:
    """A TRL config's field defaults, read off the dataclass (instances check the device)."""
    import dataclasses
    import types

    return types.SimpleNamespace(**{f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING
                                    else f.default for f in dataclasses.fields(cls)})


def test_preference_config_defaults_match_trl() -> None:
    trl = pytest.importorskip("trl")
    from trl.experimental.cpo import CPOConfig
    from trl.experimental.orpo import ORPOConfig

    pc = config_mod.Config().preference
    dpo, kto, cpo, orpo = (_defaults(c) for c in (trl.DPOConfig, trl.KTOConfig, CPOConfig, ORPOConfig))
    assert pc.beta == dpo.beta == kto.beta == cpo.beta
    assert [pc.loss_type] == list(dpo.loss_type) and pc.label_smoothing == dpo.label_smoothing
    assert pc.orpo_lambda == orpo.beta
    assert pc.simpo_gamma == cpo.simpo_gamma
    assert (pc.desirable_weight, pc.undesirable_weight) == (kto.desirable_weight, kto.undesirable_weight)
    assert config_mod.Config().train.precompute_ref is dpo.precompute_ref_log_probs is False


def test_method_and_preference_keys(tmp_path: Path) -> None:
    cfg = config_mod.build(None, {"train.method": "dpo"}, ["preference.loss_type=ipo", "preference.beta=0.5"])
    assert (cfg.train.method, cfg.preference.loss_type, cfg.preference.beta) == ("dpo", "ipo", 0.5)
    # A YAML file may set the loss and the command line the method: checked once all layers are in.
    yml = tmp_path / "c.yaml"
    yml.write_text("preference:\n  loss_type: ipo\ntrain:\n  precompute_ref: true\n", encoding="utf-8")
    assert config_mod.build(str(yml), {"train.method": "dpo"}).train.precompute_ref is True
    for sets, msg in [
        (["train.method=ppo"], "'train.method' must be one of sft, dpo, orpo, kto, simpo"),
        (["preference.loss_type=ipo"], "ipo' is a dpo loss"),
        (["train.method=dpo", "preference.label_smoothing=0.5"], r"label_smoothing' must be in \[0, 0.5\)"),
        (["train.method=orpo", "train.precompute_ref=true"], "precompute_ref' is for dpo and kto"),
        (["preference.beta=0"], "'preference.beta' must be positive"),
        (["preference.gamma=1"], "unknown config key 'preference.gamma'"),
    ]:
        with pytest.raises(UserError, match=msg):
            config_mod.build(None, None, sets)
    sample = config_mod.build(str(Path(__file__).resolve().parent.parent / "configs" / "dpo_sample.yaml"))
    assert sample.train.method == "dpo" and sample.data.path == "data/prefs_sample.jsonl"
    saved = config_mod.Config()
    saved.train.method = "kto"
    assert config_mod.from_dict(saved.to_dict(), "config.yaml").train.method == "kto"
    assert np.isclose(config_mod.from_dict(saved.to_dict(), "c").preference.simpo_gamma, 0.5)


def test_random_pairs_share_their_prompt_exactly(tokenizer_dir: Any) -> None:
    # Any texts (spaces, newlines, markup-like text): each row is the prompt's own tokens followed
    # by the answer's, on a prefix-stable template the same tokens as the whole chat's render.
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import strategies as st

    tok, template = _tok(tokenizer_dir, "qwen2"), _template("qwen2.5.jinja")
    text = st.text(alphabet=st.sampled_from(list("ab c\n.<>|-é")), min_size=1, max_size=30).filter(str.strip)

    @hypothesis.settings(max_examples=40, deadline=None, derandomize=True)
    @hypothesis.given(text, text, text)
    def check(q: str, good: str, bad: str) -> None:
        hypothesis.assume(good.strip() != bad.strip())
        sample = PairSample([{"role": "user", "content": q}], [{"role": "assistant", "content": good}],
                            [{"role": "assistant", "content": bad}], "f:1")
        try:
            ex = render_pair(sample, tok, template)
        except UserError as e:  # the template trims both answers to the same text
            assert "render to the same tokens" in str(e)
            return
        gen = tok(tok.apply_chat_template(sample.prompt, chat_template=template, tokenize=False,
                                          add_generation_prompt=True), add_special_tokens=False)["input_ids"]
        assert ex.prompt_ids == gen
        for answer, (row, _) in ((sample.chosen, ex.rows()), (sample.rejected, ex.rows()[::-1])):
            full = tok(tok.apply_chat_template(sample.prompt + answer, chat_template=template, tokenize=False),
                       add_special_tokens=False)["input_ids"]
            if ex.split_render == 0:
                assert full[:len(row.input_ids)] == row.input_ids
            assert row.input_ids[:len(gen)] == gen and any(row.loss_mask) and not any(row.loss_mask[:len(gen)])

    check()
