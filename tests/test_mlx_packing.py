"""MLX packed batches and the target-rows head: the same loss and gradients as padded batches with
full-vocabulary logits, on tiny random Qwen2, Llama and Gemma 3 models (plus Gemma 2's softcapping
and Granite's logits_scaling for the head)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

from train_helpers import DATA, train_cfg  # noqa: E402

from qlocal.objectives import SFT  # noqa: E402


def _examples(model_dir: Path, n: int = 8, max_len: int = 512) -> list:  # type: ignore[type-arg]
    from qlocal.data.formats import load_samples
    from qlocal.data.render import render
    from qlocal.data.templates import resolve_chat_template
    from qlocal.hf import load_tokenizer

    tok = load_tokenizer(model_dir)
    template, _ = resolve_chat_template(tok, None)
    samples, _ = load_samples(str(DATA))
    return [render(s, tok, template, max_seq_len=max_len) for s in samples[:n]]


def _backend(model_dir: Path, tmp: Path, **kw: object):  # type: ignore[no-untyped-def]
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from qlocal.backends.mlx_backend import MLXBackend

    b = MLXBackend()
    b.setup(model_dir, train_cfg("mlx", model_dir, tmp, "x", **kw))
    # LoRA B starts at 0 (so A's gradient is 0): random B makes every gradient informative.
    mx.random.seed(1)
    b.model.load_weights([(k, mx.random.normal(v.shape) * 0.05) for k, v in tree_flatten(b.model.trainable_parameters())
                          if k.endswith("lora_b")], strict=False)
    return b


def _loss_and_grads(b, batch) -> tuple[float, dict[str, np.ndarray]]:  # type: ignore[no-untyped-def]
    import mlx.core as mx
    from mlx.utils import tree_flatten

    grad_fn = b._compiled(SFT())[0]
    (loss, _), grads = grad_fn(*b._arrays(batch), mx.array(1.0 / SFT().count(batch), mx.float32))
    mx.eval(loss, grads)
    return float(loss), {k: np.array(v) for k, v in tree_flatten(grads)}


def _assert_close(a: tuple[float, dict], b: tuple[float, dict], tol: float = 1e-5) -> None:  # type: ignore[type-arg]
    assert abs(a[0] - b[0]) < tol, (a[0], b[0])
    assert a[1].keys() == b[1].keys() and a[1]
    worst = max(float(np.abs(a[1][k] - b[1][k]).max()) for k in a[1])
    assert worst < tol, worst
    assert max(float(np.abs(v).max()) for v in a[1].values()) > 1e-3  # the gradients are not all ~0


@pytest.mark.parametrize("arch", ["qwen2", "llama", "gemma3"])
def test_packed_equals_padded_in_loss_and_gradients(arch: str, tiny_model_dir, tmp_path: Path) -> None:
    from qlocal.backends import mlx_packing
    from qlocal.data.batching import collate, collate_packed

    model_dir = tiny_model_dir(arch)
    b = _backend(model_dir, tmp_path)
    assert b.supports_packing and b._plan.pack and b._plan.split
    ex = _examples(model_dir)
    packed, padded = collate_packed(ex), collate(ex, 0)
    laid = mlx_packing.layout(packed, True)
    assert laid["ids"].shape[0] < len(ex)  # several examples really share a row
    assert laid["w"].sum() == SFT().count(padded) == SFT().count(packed)
    _assert_close(_loss_and_grads(b, packed), _loss_and_grads(b, padded))


@pytest.mark.parametrize("arch", ["qwen2", "gemma3"])
def test_target_rows_head_equals_full_logits_loss(arch: str, tiny_model_dir, tmp_path: Path) -> None:
    """The head on gathered target rows, in checkpointed chunks of 8, against the model's own
    full-vocabulary logits (mlx-lm's call + cross-entropy over every position, masked)."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from qlocal.backends import mlx_backend
    from qlocal.data.batching import collate

    model_dir = tiny_model_dir(arch)
    b = _backend(model_dir, tmp_path, **{"train.loss_chunk": 8})
    batch = collate(_examples(model_dir), 0)
    ids, w, rows, aux = b._arrays(batch)
    assert int(aux["sel"].shape[0]) < w.size  # fewer rows than positions reach the head

    def plain(model, ids, w):  # type: ignore[no-untyped-def]
        return -(mlx_backend._target_logprobs(model, ids) * w).sum()

    def ours(model, ids, w):  # type: ignore[no-untyped-def]
        return -(mlx_backend._target_logprobs(model, ids, aux, b._plan) * w).sum()

    got = nn.value_and_grad(b.model, ours)(b.model, ids, w)
    want = nn.value_and_grad(b.model, plain)(b.model, ids, w)
    mx.eval(got, want)
    n = SFT().count(batch)
    scale = lambda r: (float(r[0]) / n, {k: np.array(v) / n for k, v in tree_flatten(r[1])})  # noqa: E731
    _assert_close(scale(got), scale(want))
    # The eval loss goes through the same path: summed loss and count as the plain computation.
    total, count = b.eval_loss([batch])
    assert count == n and abs(total - float(plain(b.model, ids, w))) < 1e-4 * n


@pytest.mark.parametrize("arch", ["gemma2", "granite"])
def test_head_keeps_softcapping_and_logits_scaling(arch: str, tiny_model_dir, tmp_path: Path) -> None:
    import mlx.core as mx

    from qlocal.backends import mlx_backend, mlx_loss
    from qlocal.data.batching import collate

    model_dir = tiny_model_dir(arch)
    b = _backend(model_dir, tmp_path)
    text = mlx_loss._text_model(b.model)
    # The fixture really exercises the final op the split head must repeat.
    assert getattr(text, "final_logit_softcapping", None) or getattr(text, "logits_scaling", 1) != 1
    assert b._plan.split
    batch = collate(_examples(model_dir), 0)
    ids, w, _, aux = b._arrays(batch)
    got = mlx_backend._target_logprobs(b.model, ids, aux, b._plan) * w
    want = mlx_backend._target_logprobs(b.model, ids) * w
    assert float(mx.abs(got - want).max()) < 1e-5


def test_layout_keeps_every_target_once() -> None:
    from qlocal.backends import mlx_loss, mlx_packing
    from qlocal.data.batching import collate_packed
    from qlocal.data.render import Example

    rng = np.random.default_rng(0)
    lens = [5, 40, 17, 33, 8, 60, 2]
    ex = [Example(list(rng.integers(1, 99, n)), list(rng.integers(0, 2, n))) for n in lens]
    batch = collate_packed(ex)
    laid = mlx_packing.layout(batch, True)
    ids, w, seg = laid["ids"], laid["w"], laid["seg"]
    assert ids.shape[1] >= max(lens) and ids.shape[0] < len(lens)
    assert w.sum() == batch["loss_mask"][:, 1:].sum()
    # Each example sits whole in one row, its positions restart at 0 and its first token is no target.
    for e in ex:
        found = [(r, c) for r in range(ids.shape[0]) for c in range(ids.shape[1] - len(e.input_ids) + 1)
                 if list(ids[r, c:c + len(e.input_ids)]) == e.input_ids and laid["pos"][r, c] == 0]
        assert found
    assert (seg >= 0).sum() == sum(lens) and not w[seg[:, 1:] < 0].any()  # filler: no targets
    one_each = mlx_packing.layout(batch, False)
    assert one_each["ids"].shape[0] == len(lens) and "pos" not in one_each
    assert one_each["w"].sum() == w.sum()
    sel, valid = mlx_loss.target_rows(w)
    assert valid.sum() == w.sum() and len(sel) == mlx_loss.bucket(int(w.sum()))
    assert [mlx_loss.bucket(n) for n in (1, 32, 33, 100, 1000, 1025)] == [32, 32, 40, 112, 1024, 1280]


def _window_copy(model_dir: Path, out: Path, window: int) -> Path:
    """A copy of a tiny model folder whose sliding window is `window` (the fixture's is shared)."""
    import json
    import shutil

    shutil.copytree(model_dir, out)
    cfg = json.loads((out / "config.json").read_text())
    for c in (cfg, cfg.get("text_config") or {}):
        if "sliding_window" in c:
            c["sliding_window"] = window
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.mark.parametrize("arch", ["qwen2", "llama", "gemma3"])
def test_chunked_attention_equals_masked_attention(arch: str, tiny_model_dir, tmp_path: Path, monkeypatch) -> None:
    """Attention in checkpointed chunks of 16 queries (mlx_attention) against mlx's attention with
    the whole W x W mask, on packed and on padded rows: the same loss and gradients. Gemma 3's
    sliding window is cut to 24 tokens, so its window layers cut key blocks too."""
    from qlocal.backends import mlx_attention, mlx_packing
    from qlocal.data.batching import collate, collate_packed

    model_dir = tiny_model_dir(arch)
    if arch == "gemma3":
        model_dir = _window_copy(model_dir, tmp_path / "gemma3-w24", 24)
    b = _backend(model_dir, tmp_path / "run")
    assert b._plan.pack and b._plan.cached
    ex = _examples(model_dir)
    packed, padded = collate_packed(ex), collate(ex, 0)
    assert packed["input_ids"].shape[1] > 4 * 16 and padded["input_ids"].shape[1] > 4 * 16  # several chunks
    monkeypatch.setattr(mlx_attention, "SCORE_BUDGET", 1)  # every chunk: MIN_CHUNK (16) queries
    calls: list[tuple[int, ...]] = []
    real = mlx_attention.attend
    monkeypatch.setattr(mlx_attention, "attend", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    chunked = [_loss_and_grads(b, packed), _loss_and_grads(b, padded)]
    layers = len(b.model.layers)
    assert len(calls) == 2 * layers  # every layer of both forwards went through the chunks
    if arch == "gemma3":
        from qlocal.backends.mlx_loss import _text_model

        assert _text_model(b.model).model.window_size == 24
    b._fns = None  # retrace with the masks applied by mlx's own attention
    monkeypatch.setattr(mlx_packing.PackedCache, "attention_for", lambda self, mask: None)
    masked = [_loss_and_grads(b, packed), _loss_and_grads(b, padded)]
    assert len(calls) == 2 * layers
    for got, want in zip(chunked, masked):
        _assert_close(got, want)


def test_chunked_attention_keeps_no_width_squared_scores(tiny_model_dir, tmp_path: Path, monkeypatch) -> None:
    """The decoder's forward and backward over one packed row of two examples: at width 2,048 the
    MLX allocator's peak above what it starts with stays under one layer's (heads, W, W) float32
    scores, and doubling the width from 1,024 raises it at most 2.5x (linear plus a constant);
    mlx's masked attention at width 1,024, measured beside it, keeps more than its W x W scores."""
    import mlx.core as mx
    import mlx.nn as nn

    from qlocal.backends import mlx_attention, mlx_loss, mlx_packing

    b = _backend(tiny_model_dir("qwen2"), tmp_path)
    body = mlx_loss.split_head(b.model)[0]
    monkeypatch.setattr(mlx_attention, "SCORE_BUDGET", 1 << 20)  # 4 MiB of scores per chunk

    def peak(n: int) -> int:
        rng = np.random.default_rng(0)
        ids = mx.array(rng.integers(10, 1000, (1, n)), mx.int32)
        pos = mx.array(np.r_[np.arange(n // 2), np.arange(n - n // 2)][None], mx.int32)
        seg = mx.array(np.r_[np.zeros(n // 2), np.ones(n - n // 2)][None], mx.int32)
        probe = mx.array(rng.normal(size=(1, n, b.model.args.hidden_size)), mx.float32)

        def loss(model):  # type: ignore[no-untyped-def]
            return (body(ids, mlx_packing.caches(model, pos, seg)) * probe).sum()

        mx.eval(b.model.parameters(), ids, pos, seg, probe)
        mx.clear_cache()
        mx.reset_peak_memory()
        start = mx.get_active_memory()
        mx.eval(nn.value_and_grad(b.model, loss)(b.model))
        return mx.get_peak_memory() - start

    scores = b.model.args.num_attention_heads * 1024 * 1024 * 4  # one layer's float32 scores at 1,024
    short, long = peak(1024), peak(2048)
    assert long < 4 * scores and long < 2.5 * short, (short, long, 4 * scores)
    monkeypatch.setattr(mlx_packing.PackedCache, "attention_for", lambda self, mask: None)
    masked = peak(1024)
    assert masked > scores, (masked, scores)
