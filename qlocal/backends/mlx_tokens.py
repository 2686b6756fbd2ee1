"""Trained rows for added special tokens on MLX (config `lora.new_tokens`), PEFT's
`trainable_token_indices` rebuilt on an mlx-lm model.

The embedding (and an untied head) is wrapped: the base weights stay frozen and untouched, and a
(k, hidden) parameter `trainable_tokens_delta` holds the full rows of the k token ids (the PEFT
name and meaning: values, not differences). Ids past the base's rows grow the vocabulary; their
rows start as the mean of the base rows, as on the torch backend, so both start from one model.
"""

from __future__ import annotations

from typing import Any

from qlocal.errors import UserError

EMBED, HEAD = "embed_tokens", "lm_head"


def import_mlx() -> tuple[Any, Any, None]:
    # mlx_infer.import_mlx has checked the install by the time anything here runs (and importing
    # it here would be a cycle: mlx_infer loads adapters through this module).
    import mlx.core as mx
    import mlx.nn as nn

    return mx, nn, None


def _dense(m: Any) -> Any:
    """A linear or embedding layer's weight as float32, dequantised when affine-quantised."""
    mx, _, _ = import_mlx()
    if "scales" in m:
        return mx.dequantize(m["weight"], m["scales"], m.get("biases"), m.group_size, m.bits).astype(mx.float32)
    return m.weight.astype(mx.float32)


def _module():  # the class is built on first use, so importing this file needs no mlx
    mx, nn, _ = import_mlx()

    class TokenRows(nn.Module):
        """An embedding or output head whose rows for `ids` are `trainable_tokens_delta`."""

        def __init__(self, base: Any, ids: list[int], rows: Any, start: Any, vocab: int, head: bool) -> None:
            super().__init__()
            base.freeze()
            self.base = base
            self.trainable_tokens_delta = rows
            self._start = start  # the rows with the adapter off (base rows, the mean for new ids)
            self._enabled = True
            self._ids, self._vocab, self._head = list(ids), vocab, head
            self._base_rows = base.weight.shape[0]

        def rows(self) -> Any:
            return self.trainable_tokens_delta if self._enabled else self._start

        def _logits(self, logits: Any, h: Any) -> Any:
            rows = self.rows()
            if self._vocab > self._base_rows:
                logits = mx.concatenate(
                    [logits, mx.zeros((*logits.shape[:-1], self._vocab - self._base_rows), logits.dtype)], axis=-1)
            pick = (mx.arange(self._vocab)[None, :] == mx.array(self._ids)[:, None]).astype(logits.dtype)  # (k, V)
            return logits * (1 - pick.sum(0)) + (h @ rows.T.astype(h.dtype)).astype(logits.dtype) @ pick

        def __call__(self, x: Any) -> Any:
            if self._head:
                return self._logits(self.base(x), x)
            rows = self.rows()
            sel = (x[..., None] == mx.array(self._ids)).astype(rows.dtype)  # (..., k)
            h = self.base(mx.minimum(x, self._base_rows - 1))
            return h * (1 - sel.sum(-1, keepdims=True)).astype(h.dtype) + (sel @ rows).astype(h.dtype)

        def as_linear(self, h: Any) -> Any:
            """The tied head: the same rows as the embedding."""
            return self._logits(self.base.as_linear(h), h)

    return TokenRows


def _find(model: Any, leaf: str) -> tuple[str, Any] | None:
    return next(((p, m) for p, m in model.named_modules() if p == leaf or p.endswith("." + leaf)), None)


def attach_token_rows(model: Any, rows: dict[str, list[int]], values: dict[str, Any] | None = None) -> None:
    """Wrap the embedding (and an untied head) so the rows of the given ids are trainable.

    `rows`: PEFT's trainable_token_indices ({"embed_tokens": ids, "lm_head": ids}); `values`:
    module leaf -> (k, hidden) rows to start from (an adapter's), else base rows / the mean."""
    mx, _, _ = import_mlx()
    from mlx.utils import tree_unflatten

    TokenRows = _module()
    found = {leaf: _find(model, leaf) for leaf in rows}
    for leaf, hit in found.items():
        if hit is None:
            raise UserError(f"adapter trains token rows of '{leaf}', which this MLX model does not have")
    vocab = max([max(ids) + 1 for ids in rows.values()] + [hit[1].weight.shape[0] for hit in found.values()])
    wrapped = []
    for leaf, ids in rows.items():
        path, base = found[leaf]
        if "trainable_tokens_delta" in base and values is not None:  # wrapped already: new values only
            base.trainable_tokens_delta = mx.array(values[leaf]).astype(base.trainable_tokens_delta.dtype)
            continue
        dense = _dense(base)
        mean = dense.mean(axis=0)
        dtype = base.scales.dtype if "scales" in base else base.weight.dtype
        start = mx.stack([dense[i] if i < dense.shape[0] else mean for i in ids]).astype(dtype)
        init = mx.array(values[leaf]).astype(dtype) if values is not None and leaf in values else start
        wrapped.append((path, TokenRows(base, ids, init, start, vocab, head=leaf != EMBED)))
    if wrapped:
        model.update_modules(tree_unflatten(wrapped))
    mx.eval(model.parameters())


def set_rows_enabled(model: Any, enabled: bool) -> None:
    """Adapter switch for the token rows: off = the rows training started from (as PEFT's switch
    gives the resized base's rows on torch)."""
    for _, m in model.named_modules():
        if "trainable_tokens_delta" in m:
            m._enabled = enabled


def token_indices(model: Any, ids: list[int]) -> dict[str, list[int]]:
    """PEFT's trainable_token_indices for this model: the embedding, and the head when untied."""
    rows = {EMBED: list(ids)}
    if HEAD in model:  # mlx-lm has an lm_head only when the head is not tied to the embedding
        rows[HEAD] = list(ids)
    return rows
