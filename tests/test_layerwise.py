"""The layer-by-layer reference (qlocal.export.layerwise) computes what the whole model computes.

For every export family: base + adapter run one decoder layer at a time gives the same logits, the
same greedy tokens and the same teacher-forced logits as PEFT's whole model in fp32 (forward and
`generate` with its KV cache), and holds no layer's weights once a forward is done.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

from conftest import EXPORT_ARCHS
from export_helpers import TARGETS, make_run

from qlocal.export import layerwise
from qlocal.export.fuse import load_trained, probe_ids, reference_lm

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
N_GREEDY = 5


def _tol(ref: list[np.ndarray]) -> float:
    # fp32 rounding of a different matmul order (batch, chunked head, unmerged LoRA on the layer).
    return 2e-5 * max(1.0, max(float(np.abs(r).max()) for r in ref))


def _probes(base: Path, run: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base))
    ids = probe_ids(tok, (run / "chat_template.jinja").read_text(encoding="utf-8"))
    return ids + [tok("Numbers: 0 7 42 1234 and a longer plain line of text.")["input_ids"]]


def _whole(model: Any, ids: list[list[int]]) -> tuple[list[np.ndarray], list[list[int]], list[np.ndarray]]:
    """Per probe (batch 1): logits, greedy tokens from generate (KV cache), teacher-forced logits."""
    import torch

    logits, tokens, teacher = [], [], []
    with torch.no_grad():
        for s in ids:
            x = torch.tensor([s])
            logits.append(model(input_ids=x).logits[0].numpy())
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=N_GREEDY, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)
            cont = out[0, len(s):].tolist()
            tokens.append(cont)
            full = torch.tensor([s + cont])
            teacher.append(model(input_ids=full).logits[0, len(s) - 1: len(s) + N_GREEDY - 1].numpy())
    return logits, tokens, teacher


@pytest.mark.parametrize("arch", EXPORT_ARCHS)
def test_trained_reference_equals_whole_model(arch: str, tiny_model_dir, tmp_path: Path) -> None:
    base = tiny_model_dir(arch)
    # Qwen3-MoE's experts are 3-D parameters (no nn.Linear): LoRA on attention, as its training does.
    run = make_run(base, tmp_path / "run", targets=ATTENTION if arch == "qwen3moe" else TARGETS)
    ids = _probes(base, run)
    lm = layerwise.trained_lm(base, run / "adapter")
    got = lm.greedy(ids, N_GREEDY)
    assert lm.mode == "layer by layer"
    # Nothing of a decoder layer stays in memory after the forwards.
    layers = [p for n, p in lm.model.named_parameters() if ".layers." in n]
    assert layers and all(p.is_meta for p in layers)

    want_logits, want_tokens, want_teacher = _whole(load_trained(base, run / "adapter"), ids)
    tol = _tol(want_logits)
    for g, w in zip(got.prompt_logits, want_logits):
        assert g.shape == w.shape and g.dtype == np.float32
        assert float(np.abs(g - w).max()) < tol
    assert got.tokens == want_tokens
    for g, w in zip(got.step_logits, want_teacher):
        assert g.shape == w.shape and float(np.abs(g - w).max()) < tol
    # The check has teeth: the base alone is far from base + adapter.
    plain = layerwise.folder_lm(base).logits(ids)
    assert max(float(np.abs(p - w).max()) for p, w in zip(plain, want_logits)) > 100 * tol


@pytest.mark.parametrize("arch", ["gemma2", "qwen3moe"])
def test_merged_and_folder_sources(arch: str, tiny_model_dir, tmp_path: Path) -> None:
    """The streamed fp32 merge and a plain folder (Qwen3-MoE: per-expert tensors stacked as
    transformers holds them) against the same weights loaded whole."""
    import torch
    from transformers import AutoModelForCausalLM

    from qlocal.export.fuse import _with_merged
    from qlocal.export.merge import merged_tensors

    base = tiny_model_dir(arch)
    run = make_run(base, tmp_path / "run", targets=ATTENTION)
    ids = _probes(base, run)
    whole = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    plain_want = _whole(whole, ids)[0]
    merged_want = _whole(_with_merged(whole, merged_tensors(base, run / "adapter")), ids)[0]
    for lm, want in ((reference_lm("folder", base), plain_want),
                     (reference_lm("merged", base, run / "adapter"), merged_want)):
        assert lm.mode == "layer by layer"
        got = lm.logits(ids)
        assert max(float(np.abs(g - w).max()) for g, w in zip(got, want)) < _tol(want)


def test_unknown_checkpoint_name_is_unsupported(tiny_model_dir, tmp_path: Path) -> None:
    """A checkpoint whose names do not map onto the model's parameters is refused by name..."""
    import shutil

    base = tiny_model_dir("llama")
    odd = tmp_path / "odd"
    shutil.copytree(base, odd)
    path = odd / "model.safetensors"  # rename one tensor in place (same length: the header stays valid)
    raw = path.read_bytes()
    assert raw.count(b"model.norm.weight") == 1
    path.write_bytes(raw.replace(b"model.norm.weight", b"model.norm.wEight"))
    with pytest.raises(layerwise.Unsupported, match="model.norm.weight"):
        layerwise.folder_lm(odd)


def test_fallback_is_the_whole_model_and_says_so(tiny_model_dir, tmp_path: Path, monkeypatch) -> None:
    """...and then reference_lm computes the same thing with the whole model, naming why."""
    base = tiny_model_dir("qwen2")
    run = make_run(base, tmp_path / "run")
    ids = _probes(base, run)
    want = reference_lm("trained", base, run / "adapter").greedy(ids, N_GREEDY)

    def refuse(*args: Any) -> Any:
        raise layerwise.Unsupported("stacked experts")

    monkeypatch.setattr(layerwise, "trained_lm", refuse)
    lm = reference_lm("trained", base, run / "adapter")
    assert isinstance(lm, layerwise.WholeLM) and lm.mode == "whole model (stacked experts)"
    got = lm.greedy(ids, N_GREEDY)
    assert got.tokens == want.tokens
    for g, w in zip(got.prompt_logits + got.step_logits, want.prompt_logits + want.step_logits):
        assert float(np.abs(g - w).max()) < _tol([w])


@pytest.mark.parametrize("arch", ["qwen2", "gemma3", "phi3"])
def test_greedy_from_a_draft_is_plain_greedy(arch: str, tiny_model_dir, tmp_path: Path) -> None:
    """A draft (a GGUF's guess of the continuation) changes how many forwards greedy takes, never
    what it returns: the right draft takes one forward; a wrong or short one gets plain greedy's
    tokens and logits (one forward for the tokens up to its first miss and the model's own token
    there, then one per token)."""
    base = tiny_model_dir(arch)
    run = make_run(base, tmp_path / "run")
    ids = _probes(base, run)
    lm = layerwise.trained_lm(base, run / "adapter")
    want = lm.greedy(ids, N_GREEDY)
    assert want.forwards == N_GREEDY
    vocab = want.step_logits[0].shape[1]
    wrong_at_2 = [t[:2] + [(t[2] + 1) % vocab] + t[3:] for t in want.tokens]
    for draft, forwards in ((want.tokens, 1), ([t + [0] for t in want.tokens], 1), (wrong_at_2, 1 + N_GREEDY - 3),
                            ([t[:1] for t in want.tokens], N_GREEDY - 1), ([[] for _ in ids], N_GREEDY)):
        got = lm.greedy(ids, N_GREEDY, draft)
        assert got.tokens == want.tokens and got.forwards == forwards
        for g, w in zip(got.prompt_logits + got.step_logits, want.prompt_logits + want.step_logits):
            assert g.shape == w.shape and float(np.abs(g - w).max()) < _tol([w])


@pytest.mark.parametrize("arch", ["qwen2", "gemma3"])
def test_cached_steps_equal_whole_forwards(arch: str, tiny_model_dir, tmp_path: Path) -> None:
    """After drafts that miss at different places (rows of the KV cache with gaps of different
    widths), the cached steps give what whole forwards give; a sliding window the sequences
    outgrow turns the cache off (greedy is then whole forwards, with the same result)."""
    base = tiny_model_dir(arch)
    run = make_run(base, tmp_path / "run")
    ids = _probes(base, run)
    lm = layerwise.trained_lm(base, run / "adapter")
    want = lm.greedy(ids, N_GREEDY)
    vocab = want.step_logits[0].shape[1]
    misses = [0, 2, N_GREEDY, 1][: len(ids)]
    draft = [t[:m] + [(t[m] + 1) % vocab] + t[m + 1:] if m < N_GREEDY else t for t, m in zip(want.tokens, misses)]
    widths = [len(p) + len(d) for p, d in zip(ids, draft)]
    assert lm._cacheable(widths, N_GREEDY)
    text = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    window = getattr(text, "sliding_window", None)
    cases = [("cached", 1 + N_GREEDY - 1)]
    if window:  # a window just under the longest padded row: the cache is not used
        cases.append(("window", 1 + N_GREEDY - 1))
    for case, forwards in cases:
        if case == "window":
            text.sliding_window = max(widths) + 1
            assert not lm._cacheable(widths, N_GREEDY)
        got = lm.greedy(ids, N_GREEDY, draft)
        assert got.tokens == want.tokens and got.forwards == forwards
        for g, w in zip(got.prompt_logits + got.step_logits, want.prompt_logits + want.step_logits):
            assert g.shape == w.shape and float(np.abs(g - w).max()) < _tol([w])
    if window:
        text.sliding_window = window


def test_pooled_reads_are_read_bit_for_bit(tiny_model_dir, tmp_path: Path) -> None:
    """The layer reference's buffer pool returns exactly what the tensors' own read() does: bf16
    widening, fp16/fp32 copies and the fp32 LoRA merge, whole or by rows, buffer reused."""
    import torch
    from transformers import AutoModelForCausalLM

    from qlocal.export.merge import merged_tensors
    from qlocal.export.weight_pool import WeightPool

    base = tiny_model_dir("qwen2")
    run = make_run(base, tmp_path / "run")
    pool = WeightPool()
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        folder = tmp_path / str(dtype)
        AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype).save_pretrained(folder)
        for name, t in merged_tensors(folder, run / "adapter").items():
            for src in (t, t.base):
                assert np.array_equal(pool.read("same key", src), src.read()), (dtype, name)
                if src.shape and src.shape[0] > 3:
                    assert np.array_equal(pool.read("rows", src, 1, 3), src.read(1, 3))
        assert any(t.lora_a is not None for t in merged_tensors(folder, run / "adapter").values())
