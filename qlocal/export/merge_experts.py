"""LoRA on MoE experts (PEFT `target_parameters`), as per-expert LoRA pairs the streaming merge applies.

transformers 5 keeps Qwen3-MoE's experts as stacked parameters, `mlp.experts.gate_up_proj`
(E, 2*ff, hidden) and `mlp.experts.down_proj` (E, hidden, ff), and PEFT adapts them with a
ParamWrapper per parameter (nested: the module's adapter keys are `experts.lora_*` and
`experts.base_layer.lora_*`). Its lora_A is (E*r, in), expert-major; lora_B is (out, r*E),
rank-major; expert e's update is scale * B[:, :, e] @ A[e] (peft ParamWrapper.get_delta_weight).
The checkpoint on disk holds one 2-D tensor per expert (`experts.<e>.gate_proj.weight`, ...), so
each expert's slice becomes an ordinary LoRA pair on that tensor: merge.py merges it row chunk by
row chunk like any linear layer, and the GGUF writer stacks the merged experts (gguf_experts).
Which parameter an adapter pair belongs to is read from its shapes (gate_up: hidden -> 2*ff,
down: ff -> hidden, never equal), not from PEFT's nesting order.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from qlocal.errors import UserError

_WRAPPED = re.compile(r"^(?P<mod>.+\.mlp\.experts)(?:\.base_layer)*$")
_PER_EXPERT = re.compile(r"^(?P<mod>.+\.mlp\.experts)\.(?P<e>\d+)\.(?P<proj>gate|up|down)_proj\.weight$")

Pair = tuple[np.ndarray, np.ndarray, float]


def expand_expert_lora(modules: dict[str, Pair], index: dict[str, Any], adapter_dir: Path) -> dict[str, Pair]:
    """`modules` (module path -> (A, B, scale)) with every stacked-expert LoRA replaced by one pair per
    expert tensor of the base (`<experts>.<e>.<proj>_proj` -> (A_e, B_e rows, scale))."""
    import json

    from qlocal.adapters import CONFIG_FILE, lora_scale

    config = json.loads((Path(adapter_dir) / CONFIG_FILE).read_text(encoding="utf-8"))
    if not config.get("target_parameters"):
        return modules
    out: dict[str, Pair] = {}
    for path, (a, b, _) in modules.items():
        m = _WRAPPED.match(path)
        if m is None:
            out[path] = (a, b, _)
            continue
        mod = m["mod"]
        experts = _base_experts(index, mod)
        if not experts:
            raise UserError(f"{adapter_dir}: LoRA on {mod}'s stacked parameters needs the base's experts as "
                            f"per-expert tensors ({mod}.0.gate_proj.weight, ...), as released checkpoints hold them")
        n = len(experts["gate"])
        ff, hidden = experts["gate"][0].shape
        rows, in_f = a.shape
        out_f = b.shape[0]
        if rows % n:
            raise UserError(f"{adapter_dir}: {path} lora_A has {rows} rows, not a multiple of the {n} experts")
        if (in_f, out_f) == (hidden, 2 * ff):
            param, projs = "gate_up_proj", (("gate", 0, ff), ("up", ff, 2 * ff))
        elif (in_f, out_f) == (ff, hidden):
            param, projs = "down_proj", (("down", 0, hidden),)
        else:
            raise UserError(f"{adapter_dir}: {path} LoRA maps {in_f} -> {out_f}, which is neither gate_up_proj "
                            f"({hidden} -> {2 * ff}) nor down_proj ({ff} -> {hidden}) of the base's experts")
        r = rows // n
        scale = lora_scale(config, f"{mod}.{param}", r)
        a_e = a.reshape(n, r, in_f)
        b_e = b.reshape(out_f, r, n)
        for e in range(n):
            for proj, lo, hi in projs:
                out[f"{mod}.{e}.{proj}_proj"] = (np.ascontiguousarray(a_e[e]),
                                                 np.ascontiguousarray(b_e[lo:hi, :, e]), scale)
    return out


def _base_experts(index: dict[str, Any], mod: str) -> dict[str, list[Any]]:
    """proj -> the base's per-expert tensors of module `mod`, in expert order (empty if stacked on disk)."""
    found: dict[str, dict[int, Any]] = {}
    for name, st in index.items():
        m = _PER_EXPERT.match(name)
        if m and m["mod"] == mod:
            found.setdefault(m["proj"], {})[int(m["e"])] = st
    if set(found) != {"gate", "up", "down"}:
        return {}
    return {proj: [by_e[e] for e in sorted(by_e)] for proj, by_e in found.items()}


def model_parameter(model: Any, name: str) -> Any:
    """The tensor a checkpoint name fills in a loaded model: itself, or for a per-expert name on a
    model with stacked experts (transformers 5) that expert's slice of gate_up_proj / down_proj."""
    m = _PER_EXPERT.match(name)
    if m is None:
        return model.get_parameter(name)
    experts = model.get_submodule(m["mod"])
    e = int(m["e"])
    if m["proj"] == "down":
        return experts.down_proj[e] if hasattr(experts, "down_proj") else model.get_parameter(name)
    if not hasattr(experts, "gate_up_proj"):
        return model.get_parameter(name)
    ff = experts.gate_up_proj.shape[1] // 2
    return experts.gate_up_proj[e, :ff] if m["proj"] == "gate" else experts.gate_up_proj[e, ff:]
