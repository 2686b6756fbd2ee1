"""Attention on mlx-lm models without a (rows, heads, W, W) score tensor kept for the backward.

mlx-lm's attention modules call `scaled_dot_product_attention(q, k, v, cache=..., scale=...,
mask=...)` from mlx_lm/models/base.py, which hands the mask to mx.fast.scaled_dot_product_attention.
On CPU (and in its VJP everywhere) that materialises every row's W x W scores per head and keeps
them for the backward pass, so a step's memory grows with W^2. `install` points the name that
each attention module's own file imported at `_dispatch`, which sends a call whose cache is
qlocal's (mlx_packing.PackedCache, recognised by the mask it handed out) to `attend` and any
other call to mlx-lm's own function unchanged. The model classes are not copied or changed.

`attend` splits the queries into chunks, each attending only to the keys it can see (up to its
last query: causal; from its first query's window start: sliding-window layers), with the
segment mask of packed rows cut to that block. Its VJP recomputes each chunk's scores in turn
(mlx's own attention VJP on the chunk) instead of keeping them, and the chunks run one after
another. Score memory per chunk is about SCORE_BUDGET elements, whatever W is; rows short enough
for one chunk take mlx's attention as before.
"""

from __future__ import annotations

from typing import Any

SCORE_BUDGET = 1 << 24  # score elements per chunk (rows x heads x queries x keys): 64 MiB in fp32
MIN_CHUNK = 32


def chunk_rows(rows: int, heads: int, width: int) -> int:
    """Queries per chunk for rows x heads x width scores: width itself when all fit the budget."""
    per_query = rows * heads * width
    if per_query * width <= SCORE_BUDGET:
        return width
    return max(MIN_CHUNK, SCORE_BUDGET // per_query // MIN_CHUNK * MIN_CHUNK)


def _keep(a: int, e: int, lo: int, seg: Any, window: int | None) -> Any:
    """Boolean mask of queries a..e-1 over keys lo..e-1: causal, in the window, same segment."""
    import mlx.core as mx

    qi, ki = mx.arange(a, e)[:, None], mx.arange(lo, e)[None]
    keep = qi >= ki
    if window is not None:
        keep = keep & (qi < ki + window)
    if seg is not None:  # (R, W) segment ids -> (R, 1, queries, keys)
        keep = keep & (seg[:, None, a:e, None] == seg[:, None, None, lo:e])
    return keep


def attend(q: Any, k: Any, v: Any, scale: float, seg: Any = None, window: int | None = None,
           chunk: int | None = None) -> Any:
    """Causal attention of q (B, Hq, L, D) over k, v (B, Hkv, L, D) (grouped heads as mlx's),
    inside each segment of `seg` (B, L) if given and within `window` keys if given, in chunks of
    `chunk` queries (default: chunk_rows), each chunk's scores recomputed in the backward pass."""
    import mlx.core as mx

    b, h, n, _ = q.shape
    chunk = min(n, chunk or chunk_rows(b, h, n))
    blocks = [(a, min(a + chunk, n), max(0, a - window + 1) if window is not None else 0) for a in range(0, n, chunk)]

    def piece(blk: tuple[int, int, int], qc: Any, kc: Any, vc: Any) -> Any:
        return mx.fast.scaled_dot_product_attention(qc, kc, vc, scale=scale, mask=_keep(*blk, seg, window))

    def cut(blk: tuple[int, int, int], q: Any, k: Any, v: Any) -> tuple[Any, Any, Any]:
        a, e, lo = blk
        return q[:, :, a:e], k[:, :, lo:e], v[:, :, lo:e]

    if len(blocks) == 1:
        return piece(blocks[0], q, k, v)

    # mlx evaluates a graph breadth-first (up to MLX_BFS_MAX_WIDTH branches at once), which would
    # run the chunks side by side with all their scores alive: each chunk's inputs are made to
    # depend on the chunk before (mx.depends), so one chunk's scores exist at a time.
    @mx.custom_function
    def chunked(q: Any, k: Any, v: Any) -> Any:
        outs: list[Any] = []
        for blk in blocks:
            part = cut(blk, q, k, v)
            outs.append(piece(blk, *(mx.depends(list(part), outs[-1:]) if outs else part)))
        return mx.concatenate(outs, axis=2)

    @chunked.vjp
    def chunked_vjp(primals: Any, cotangent: Any, _: Any) -> Any:
        # One chain of sums over the chunks, each chunk's q, k and v gradients in one array, so
        # the backward finishes a chunk (and frees its recomputed scores) before the next one.
        q, k, v = primals
        sizes = [q.size, k.size, v.size]
        total = None
        for blk in blocks:
            a, e, lo = blk
            part = [*cut(blk, q, k, v), cotangent[:, :, a:e]]
            part = part if total is None else mx.depends(part, [total])
            _, grads = mx.vjp(lambda qc, kc, vc, blk=blk: piece(blk, qc, kc, vc), part[:3], part[3:])
            spans = [(a, e), (lo, e), (lo, e)]
            part = mx.concatenate([mx.pad(g, [(0, 0), (0, 0), (s, n - t), (0, 0)]).reshape(-1)
                                   for g, (s, t) in zip(grads, spans)])
            total = part if total is None else total + part
        dq, dk, dv = mx.split(total, [sizes[0], sizes[0] + sizes[1]])
        return dq.reshape(q.shape), dk.reshape(k.shape), dv.reshape(v.shape)

    return chunked(q, k, v)


def _dispatch(original: Any) -> Any:
    def scaled_dot_product_attention(queries: Any, keys: Any, values: Any, cache: Any, scale: float,
                                     mask: Any, sinks: Any = None) -> Any:
        spec = getattr(cache, "attention_for", None)
        spec = spec(mask) if spec is not None and sinks is None else None
        if spec is not None and queries.shape[2] == keys.shape[2]:
            return attend(queries, keys, values, scale, *spec)
        return original(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)

    scaled_dot_product_attention.qlocal_original = original  # type: ignore[attr-defined]
    return scaled_dot_product_attention


def install(modules: list[Any]) -> int:
    """Route these attention modules' mlx-lm attention call through `_dispatch` (once per source
    file; calls without qlocal's cache are unchanged). Returns how many modules now go through it;
    a module whose file calls mlx's attention directly keeps its mask (correct, W x W)."""
    from mlx_lm.models import base

    routed = 0
    for m in modules:
        names = getattr(type(m).__call__, "__globals__", {})
        f = names.get("scaled_dot_product_attention")
        if f is base.scaled_dot_product_attention:
            names["scaled_dot_product_attention"] = f = _dispatch(f)
        routed += getattr(f, "qlocal_original", None) is not None
    return routed
