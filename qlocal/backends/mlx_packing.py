"""Padding-free packed batches on mlx-lm models: block-diagonal attention and per-example RoPE.

mlx-lm's model classes take no attention mask or position ids, but every attention module asks
its KV cache for both: the mask through `cache.make_mask(...)` (via create_attention_mask, with
the layer's sliding window) and the RoPE offset as `cache.offset`. `PackedCache` is a cache that
stores nothing and answers with a mask built from segment ids (causal, inside one example, within
the window) and an offset that is the (rows, width) array of per-example positions. mx.fast.rope
takes one offset per batch row, not per token, so `TokenRope` wraps each attention's own RoPE
module (whatever its scaling) and, given per-token positions, applies it to every token as a
batch row of length 1 with its own offset. Nothing of the model's code is copied.

The mask is only what the attention gets when it is not routed through mlx_attention
(`route_attention`): routed attention recognises the cache's masks and attends in checkpointed
chunks of queries instead, so no (rows, heads, W, W) scores are built or kept for the backward.

`packing_works` checks on a few tokens, once per model, that a packed row gives the padded rows'
hidden states (attending in chunks of PROBE_CHUNK); a model whose attention does something else
gets one example per row (padded). `cache_works` checks the same for padded rows through the cache.

A packed batch (one row of concatenated examples, qlocal.data.batching.collate_packed) is laid
out again here as a few rows of one width (first-fit decreasing), so attention costs about
sum(rows * width^2), not (total tokens)^2.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np

PAD_MULTIPLE = 16  # widths of padded rows round up to this; packed widths come from WIDTHS_PER_OCTAVE
WIDTHS_PER_OCTAVE = 4


def _round_width(n: int) -> int:
    if n <= 64:
        return -(-n // PAD_MULTIPLE) * PAD_MULTIPLE
    step = max(PAD_MULTIPLE, (1 << (int(n - 1).bit_length() - 1)) // WIDTHS_PER_OCTAVE)
    return -(-n // step) * step


def split_examples(batch: dict[str, np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids, loss_mask) of every example in a packed batch (each starts where its position is 0)."""
    out = []
    for ids, mask, pos in zip(batch["input_ids"], batch["loss_mask"], batch["position_ids"]):
        starts = list(np.flatnonzero(pos == 0)) + [len(ids)]
        out += [(ids[a:b], mask[a:b]) for a, b in zip(starts[:-1], starts[1:]) if b > a]
    return out


def layout(batch: dict[str, np.ndarray], pack: bool) -> dict[str, np.ndarray]:
    """Numpy arrays for one micro-batch: ids (R, W) int32, w (R, W-1) float32 target weights
    (w[:, t] = loss_mask[:, t+1]) and, for packed rows, pos and seg (R, W) int32.

    A padded batch keeps its rows (row fields stay aligned), right-padded to a multiple of 16.
    A packed batch becomes rows of one width holding whole examples; with pack=False (a model
    packing_works rejected) every example gets its own row.
    """
    if "position_ids" not in batch:
        ids, mask = np.asarray(batch["input_ids"]), np.asarray(batch["loss_mask"])
        b, t = ids.shape
        width = -(-t // PAD_MULTIPLE) * PAD_MULTIPLE
        out_ids = np.zeros((b, width), np.int32)
        out_ids[:, :t] = ids
        w = np.zeros((b, width - 1), np.float32)
        w[:, : t - 1] = mask[:, 1:]
        return {"ids": out_ids, "w": w}
    examples = split_examples(batch)
    longest = max(len(e[0]) for e in examples)
    width = _round_width(longest)
    rows: list[list[int]] = []  # example indices per row, first-fit decreasing
    room: list[int] = []
    for i in sorted(range(len(examples)), key=lambda i: -len(examples[i][0])):
        n = len(examples[i][0])
        r = next((r for r, free in enumerate(room) if pack and free >= n), None)
        if r is None:
            rows.append([])
            room.append(width)
            r = len(rows) - 1
        rows[r].append(i)
        room[r] -= n
    ids = np.zeros((len(rows), width), np.int32)
    mask = np.zeros((len(rows), width), np.float32)
    pos = np.zeros((len(rows), width), np.int32)
    seg = np.full((len(rows), width), -1, np.int32)  # -1: filler, attends only to filler
    for r, members in enumerate(rows):
        at = 0
        for s, i in enumerate(members):
            e_ids, e_mask = examples[i]
            n = len(e_ids)
            ids[r, at:at + n], mask[r, at:at + n] = e_ids, e_mask
            mask[r, at] = 0  # an example's first token is never a target
            pos[r, at:at + n], seg[r, at:at + n] = np.arange(n), s
            at += n
    out = {"ids": ids, "w": mask[:, 1:].copy()}
    if pack:
        out.update(pos=pos, seg=seg)
    return out


class PackedCache:
    """A stand-in KV cache for one forward: no storage; packed rows' mask and positions.

    pos/seg None: plain (padded) rows, positions from 0 and a causal mask. Attention routed
    through mlx_attention (route_attention) recognises the masks this cache handed out and
    attends in chunks instead of applying them; any other attention gets the mask itself."""

    def __init__(self, pos: Any = None, seg: Any = None, chunk: int | None = None) -> None:
        self.offset = 0 if pos is None else pos  # TokenRope reads a 2-D offset as per-token positions
        self._seg = seg
        self._chunk = chunk  # queries per attention chunk; None: mlx_attention.chunk_rows
        self._masks: dict[int, tuple[Any, int | None]] = {}

    def make_mask(self, n: int, return_array: bool = False, window_size: int | None = None, **_: Any) -> Any:
        import mlx.core as mx

        i = mx.arange(n)
        keep = i[:, None] >= i[None]
        if self._seg is not None:
            keep = keep & (self._seg[:, None, :, None] == self._seg[:, None, None, :])
        if window_size is not None:
            keep = keep & (i[:, None] < i[None] + window_size)
        # Lazy: never computed when the attention takes the chunked path instead.
        self._masks[id(keep)] = (keep, window_size)
        return keep  # (R, 1, W, W) (packed) or (W, W) bool: mlx's attention masks out False

    def attention_for(self, mask: Any) -> tuple[Any, int | None, int | None] | None:
        """(segments, window, chunk) for mlx_attention.attend if `mask` is one of this cache's."""
        entry = self._masks.get(id(mask))
        if entry is None or entry[0] is not mask:
            return None
        return self._seg, entry[1], self._chunk

    def update_and_fetch(self, keys: Any, values: Any) -> tuple[Any, Any]:
        return keys, values


@lru_cache(maxsize=None)
def _token_rope_class() -> Any:  # built on first use (importing this file needs no mlx), once
    import mlx.core as mx
    import mlx.nn as nn

    class TokenRope(nn.Module):
        """A model's RoPE module that also takes per-token positions ((B, L) offset)."""

        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def __call__(self, x: Any, offset: Any = 0, **kw: Any) -> Any:
            if not (isinstance(offset, mx.array) and offset.ndim == 2):
                return self.inner(x, offset=offset, **kw)
            b, h, n, d = x.shape  # (B, heads, L, D) -> (B*L, heads, 1, D): one offset per token
            flat = x.transpose(0, 2, 1, 3).reshape(b * n, h, 1, d)
            out = self.inner(flat, offset=offset.reshape(-1), **kw)
            return out.reshape(b, n, h, d).transpose(0, 2, 1, 3)

    return TokenRope


def wrap_ropes(model: Any) -> int:
    """Wrap every attention's `rope` in TokenRope (this model instance only); returns how many."""
    import mlx.nn as nn

    TokenRope = _token_rope_class()
    found = [m for _, m in model.named_modules()
             if isinstance(m.get("rope"), nn.Module) and not isinstance(m.get("rope"), TokenRope)]
    for m in found:
        m.rope = TokenRope(m.rope)
    return len(found)


def route_attention(model: Any) -> int:
    """Send this model's attention calls with a PackedCache through mlx_attention (chunked,
    no W x W scores kept); returns how many attention modules go through it."""
    import mlx.nn as nn

    from qlocal.backends import mlx_attention

    return mlx_attention.install([m for _, m in model.named_modules() if isinstance(m.get("rope"), nn.Module)])


def caches(model: Any, pos: Any = None, seg: Any = None, chunk: int | None = None) -> list[PackedCache]:
    """One PackedCache per layer (mlx-lm indexes caches by layer); pos/seg None: padded rows."""
    c = PackedCache(pos, seg, chunk)
    return [c] * len(model.layers)


PROBE_CHUNK = 4  # the probes attend in chunks this small, so more than one chunk is checked


def packing_works(model: Any, body: Any) -> bool:
    """Do two examples packed in one row give the hidden states they get in their own rows?"""
    import mlx.core as mx

    try:
        a, b = [3, 5, 7, 11, 13], [17, 19, 23]
        packed = mx.array([a + b, b + a], mx.int32)  # two rows: masks must broadcast per row
        pos = mx.array([[*range(len(a)), *range(len(b))], [*range(len(b)), *range(len(a))]], mx.int32)
        seg = mx.array([[0] * len(a) + [1] * len(b), [0] * len(b) + [1] * len(a)], mx.int32)
        got = body(packed, caches(model, pos, seg, PROBE_CHUNK)).astype(mx.float32)
        ha, hb = body(mx.array([a], mx.int32))[0], body(mx.array([b], mx.int32))[0]
        want = mx.stack([mx.concatenate([ha, hb]), mx.concatenate([hb, ha])]).astype(mx.float32)
        tol = 1e-4 if got.dtype == mx.float32 and body(packed).dtype == mx.float32 else 3e-2
        return bool(mx.allclose(got, want, rtol=tol, atol=tol * float(mx.abs(want).max() + 1)).item())
    except Exception:  # a model that reads its cache some other way: no packing
        return False


def cache_works(model: Any, body: Any) -> bool:
    """Do padded rows through a PackedCache (chunked attention) give the model's own hidden states?"""
    import mlx.core as mx

    try:
        ids = mx.array([[3, 5, 7, 11, 13, 17, 19, 23, 29], [31, 37, 41, 43, 47, 0, 0, 0, 0]], mx.int32)
        got, want = body(ids, caches(model, chunk=PROBE_CHUNK)), body(ids)
        tol = 1e-4 if want.dtype == mx.float32 else 3e-2
        return bool(mx.allclose(got.astype(mx.float32), want.astype(mx.float32), rtol=tol,
                                atol=tol * float(mx.abs(want).max() + 1)).item())
    except Exception:  # a model that reads its cache some other way: its own attention
        return False
