"""Target log-probs on MLX without full-vocabulary logits for every position.

The decoder's hidden states are gathered at the target positions only (their count rounded up to
a bucket, so mx.compile sees few shapes), and the output head + log-softmax run on those rows in
fixed-size chunks, each checkpointed: its (chunk, vocab) logits are recomputed in the backward
pass instead of kept. With a 152k vocabulary that is what most of a step's memory used to be.

mlx-lm gives no "hidden states only" call, so `split_head` takes the decoder and the head apart
(tied embedding or lm_head, then the model's own final ops: Gemma 2's softcapping, Granite's
logits_scaling, Cohere's logit_scale) and `head_matches` checks the split against the model's own
call at setup; a model it does not match keeps full logits (still gathered at the targets).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

BUCKETS_PER_OCTAVE = 4  # target-count buckets: under 25% of the gathered rows are filler
MIN_BUCKET = 32


def bucket(n: int) -> int:
    """n rounded up to the next of a few sizes per power of two (>= MIN_BUCKET)."""
    if n <= MIN_BUCKET:
        return MIN_BUCKET
    step = max(1, (1 << (int(n - 1).bit_length() - 1)) // BUCKETS_PER_OCTAVE)
    return -(-n // step) * step


def target_rows(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(flat indices of the target positions of w (R, W-1), padded to a bucket; 1/0 validity)."""
    idx = np.flatnonzero(np.asarray(w).reshape(-1) != 0).astype(np.int32)
    n = bucket(len(idx))
    sel = np.zeros(n, np.int32)
    sel[: len(idx)] = idx
    valid = np.zeros(n, np.float32)
    valid[: len(idx)] = 1.0
    return sel, valid


def _text_model(model: Any) -> Any:
    while "language_model" in model:  # multimodal wrappers (Gemma 3) hold the text model inside
        model = model.language_model
    return model


def split_head(model: Any) -> tuple[Callable[..., Any], Any, Callable[[Any, Any], Any]]:
    """(body(ids, cache) -> hidden, head module, head(module, hidden) -> float32 logits)."""
    import mlx.core as mx

    text = _text_model(model)
    body = text.model
    head_mod = text.lm_head if "lm_head" in text else body.embed_tokens
    untied = "lm_head" in text
    cap = getattr(text, "final_logit_softcapping", None)
    divisor = getattr(text, "logits_scaling", None)
    args = getattr(body, "args", None) or getattr(text, "args", None)
    scale = getattr(args, "logit_scale", None) if getattr(text, "model_type", "") == "cohere" else None

    def head(mod: Any, h: Any) -> Any:
        out = (mod(h) if untied else mod.as_linear(h)).astype(mx.float32)
        if scale:
            out = out * scale
        if divisor:
            out = out / divisor
        if cap:
            out = mx.tanh(out / cap) * cap
        return out

    def run(ids: Any, cache: Any = None) -> Any:
        return body(ids, cache=cache)

    return run, head_mod, head


def head_matches(model: Any) -> bool:
    """Does head(body(ids)) give the model's own logits? (Checked once on a few tokens.)"""
    import mlx.core as mx

    try:
        body, mod, head = split_head(model)
        ids = mx.array([[1, 2, 3, 4, 5, 6]], mx.int32)
        want = model(ids).astype(mx.float32)
        got = head(mod, body(ids))
        tol = 1e-4 if want.dtype == mx.float32 and body(ids).dtype == mx.float32 else 2e-2
        return bool(mx.allclose(got, want, rtol=tol, atol=tol * float(mx.abs(want).max() + 1)).item())
    except Exception:  # any model whose layout differs keeps the model's own call
        return False


def chunked_logprobs(h: Any, targets: Any, head_mod: Any, head: Callable[[Any, Any], Any], chunk: int) -> Any:
    """log softmax(head(h))[targets] per row, float32 (n,), `chunk` rows at a time, each chunk
    recomputed in the backward pass (the head's trainable rows, if any, get their gradient)."""
    import mlx.core as mx

    def piece(params: Any, hc: Any, tc: Any) -> Any:
        head_mod.update(params)
        logits = head(head_mod, hc)
        return mx.take_along_axis(logits, tc[:, None], axis=-1)[:, 0] - mx.logsumexp(logits, axis=-1)

    def checkpointed(tc: Any) -> Any:
        # The targets are a constant of the checkpointed function: no VJP is asked of indices.
        return mx.checkpoint(lambda params, hc: piece(params, hc, tc))

    n = h.shape[0]
    params = head_mod.trainable_parameters()
    if chunk <= 0 or n <= chunk:
        return piece(params, h, targets)
    return mx.concatenate([checkpointed(targets[i:i + chunk])(params, h[i:i + chunk]) for i in range(0, n, chunk)])

@dataclass(frozen=True)
class Plan:
    """What one model allows, found once (setup / load): the head split, packing, the chunk, and
    whether padded rows too take the chunked attention (through mlx_packing's cache)."""

    split: bool
    pack: bool
    chunk: int
    cached: bool = False


def plan_for(model: Any, chunk: int) -> Plan:
    """Wrap the model's RoPE modules for per-token positions and check what works on it."""
    from qlocal.backends.mlx_packing import cache_works, packing_works, route_attention, wrap_ropes

    wrap_ropes(model)
    route_attention(model)
    was_training = model.training
    model.eval()  # no dropout in the probes
    try:
        split = head_matches(model)
        body = split_head(model)[0] if split else (lambda ids, cache=None: model(ids, cache=cache))
        return Plan(split=split, pack=packing_works(model, body), chunk=chunk, cached=cache_works(model, body))
    finally:
        model.train(was_training)


def target_logprobs(model: Any, ids: Any, aux: dict[str, Any], plan: Plan) -> Any:
    """(R, W-1) float32: log p(ids[:, t+1] | its example up to t) at the positions aux["sel"] names
    (valid where aux["valid"] is 1), 0 elsewhere. aux["pos"]/["seg"]: packed rows."""
    import mlx.core as mx

    from qlocal.backends.mlx_packing import caches

    if "pos" in aux:
        cache = caches(model, aux["pos"], aux["seg"])
    else:  # padded rows: the chunked attention too, where the model passed cache_works
        cache = caches(model) if plan.cached else None
    r, w = ids.shape
    sel, valid = aux["sel"], aux["valid"]
    targets = ids[:, 1:].reshape(-1)[sel]
    if plan.split:
        body, mod, head = split_head(model)
        h = body(ids, cache)[:, :-1]
        h = h.reshape(r * (w - 1), h.shape[-1])[sel]
        logp = chunked_logprobs(h, targets, mod, head, plan.chunk)
    else:  # the model's own call: full logits, gathered at the targets
        logits = model(ids, cache=cache)[:, :-1].astype(mx.float32)
        logits = logits.reshape(r * (w - 1), logits.shape[-1])[sel]
        logp = mx.take_along_axis(logits, targets[:, None], axis=-1)[:, 0] - mx.logsumexp(logits, axis=-1)
    return mx.zeros((r * (w - 1),), mx.float32).at[sel].add(logp * valid).reshape(r, w - 1)
