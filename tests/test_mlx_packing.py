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
