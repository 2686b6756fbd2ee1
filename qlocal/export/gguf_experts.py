"""Mixture-of-experts weights as llama.cpp stores them: one 3-D tensor per layer and projection.

HF checkpoints hold Qwen3-MoE experts in one of two layouts. Per expert, one 2-D tensor each
(`model.layers.N.mlp.experts.E.gate_proj.weight`): the released checkpoints, and what
transformers 5's save_pretrained still writes (it reverts its in-memory layout on save). Or
stacked, as transformers 5 holds them in memory: `mlp.experts.gate_up_proj` (E, 2*ff, hidden),
gate rows first, and `mlp.experts.down_proj` (E, hidden, ff). llama.cpp wants `ffn_gate_exps`,
`ffn_up_exps` (E, ff, hidden) and `ffn_down_exps` (E, hidden, ff) in PyTorch order, as its
Qwen2MoeModel converter writes them.

Both layouts become lazy views here whose rows are experts: the converter reads a few experts at a
time (its row chunks), so memory stays one chunk, never a whole layer or the model. Each expert is
read through the object it came as (a base tensor or merge.MergedTensor), so a LoRA update on a
per-expert weight is merged in fp32 on the way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from qlocal.errors import UserError

_PER_EXPERT = re.compile(r"^(?P<prefix>.+\.mlp\.experts)\.(?P<e>\d+)\.(?P<proj>gate|up|down)_proj\.weight$")
_STACKED = re.compile(r"^(?P<prefix>.+\.mlp\.experts)\.(?P<proj>gate_up|down)_proj(?:\.weight)?$")


@dataclass(frozen=True)
class StackedExperts:
    """Per-expert 2-D tensors seen as one (E, out, in) tensor; rows [a, b) are experts a..b-1."""

    parts: tuple[Any, ...]  # objects with `shape` and `read()` (gguf.StTensor, merge.MergedTensor)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.parts), *self.parts[0].shape)

    def read(self, row_start: int = 0, row_stop: int | None = None) -> np.ndarray:
        """Experts [row_start, row_stop) stacked, float32."""
        stop = len(self.parts) if row_stop is None else row_stop
        out = np.empty((stop - row_start, *self.parts[0].shape), dtype=np.float32)
        for i, e in enumerate(range(row_start, stop)):
            out[i] = self.parts[e].read()
        return out


@dataclass(frozen=True)
class ExpertRows:
    """Rows [lo, hi) of every expert of a stacked (E, rows, in) tensor: gate or up of gate_up_proj."""

    base: Any
    lo: int
    hi: int

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.base.shape[0], self.hi - self.lo, *self.base.shape[2:])

    def read(self, row_start: int = 0, row_stop: int | None = None) -> np.ndarray:
        return np.ascontiguousarray(self.base.read(row_start, row_stop)[:, self.lo:self.hi])


def n_experts(hp: dict[str, Any]) -> int:
    """Experts per MoE layer: released configs say num_experts, transformers 5 writes num_local_experts."""
    n = hp.get("num_experts") or hp.get("num_local_experts")
    if not n:
        raise UserError("config.json: a MoE model needs num_experts (or num_local_experts)")
    return int(n)


def stack_experts(tensors: dict[str, Any], hp: dict[str, Any]) -> dict[str, Any]:
    """`tensors` with every layer's experts as `<prefix>.{gate,up,down}_proj.weight` (E, ., .) views.

    Other tensors pass through in order. A layer missing an expert, or experts of different shapes,
    is a one-line UserError (a truncated or mixed checkpoint would otherwise convert silently)."""
    count = n_experts(hp)
    out: dict[str, Any] = {}
    groups: dict[str, dict[int, Any]] = {}
    for name, t in tensors.items():
        m = _PER_EXPERT.match(name)
        if m:
            key = f"{m['prefix']}.{m['proj']}_proj.weight"
            out.setdefault(key, None)  # keeps the layer's place in the order; filled below
            groups.setdefault(key, {})[int(m["e"])] = t
            continue
        m = _STACKED.match(name)
        if m and len(t.shape) == 3:
            if m["proj"] == "down":
                out[f"{m['prefix']}.down_proj.weight"] = t
                continue
            ff = t.shape[1] // 2
            if t.shape[1] != 2 * ff:
                raise UserError(f"tensor {name}: gate_up_proj {t.shape} has an odd row count; "
                                "expected (experts, 2 * moe_intermediate_size, hidden)")
            out[f"{m['prefix']}.gate_proj.weight"] = ExpertRows(t, 0, ff)
            out[f"{m['prefix']}.up_proj.weight"] = ExpertRows(t, ff, 2 * ff)
            continue
        out[name] = t
    for key, parts in groups.items():
        missing = sorted(set(range(count)) - set(parts))
        extra = sorted(set(parts) - set(range(count)))
        if missing or extra:
            raise UserError(f"{key}: the checkpoint has experts {sorted(parts)[:8]}... but config.json "
                            f"num_experts is {count} (missing {missing[:8]}, unexpected {extra[:8]}); "
                            "is the checkpoint complete?")
        shapes = {tuple(p.shape) for p in parts.values()}
        if len(shapes) != 1:
            raise UserError(f"{key}: experts have different shapes {sorted(shapes)}; cannot stack them")
        out[key] = StackedExperts(tuple(parts[e] for e in range(count)))
    return out
