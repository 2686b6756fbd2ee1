"""One adapter format on disk (PEFT): adapters move between the MLX and torch backends unchanged.

Frameworks' fp32 kernels already differ a little on the bare model; an adapter must not widen that
gap by more than 2x, and must move the logits the same way (same top-1 tokens) in both.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from qlocal import adapters
from qlocal import config as config_mod
from qlocal.errors import UserError
from train_helpers import sample_batches

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data/alpaca_sample.jsonl"
EPS = 1e-5


# ---------------------------------------------------------------- pure numpy conversion

def test_mlx_peft_names_and_transposes_round_trip() -> None:
    rng = np.random.default_rng(0)
    mlx_w = {"model.layers.3.self_attn.q_proj.lora_a": rng.random((64, 8), dtype=np.float32),
             "model.layers.3.self_attn.q_proj.lora_b": rng.random((8, 32), dtype=np.float32)}
    peft_w = adapters.mlx_to_peft(mlx_w)
    a = peft_w["base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"]
    b = peft_w["base_model.model.model.layers.3.self_attn.q_proj.lora_B.weight"]
    assert a.shape == (8, 64) and b.shape == (32, 8)  # PEFT: A (r, in), B (out, r)
    back = adapters.peft_to_mlx(peft_w)
    assert back.keys() == mlx_w.keys() and all(np.array_equal(back[k], mlx_w[k]) for k in mlx_w)
    assert adapters.lora_modules(back) == {"model.layers.3.self_attn.q_proj": 8}
    # PEFT's in-memory names (with the adapter name) map the same way.
    assert adapters.peft_to_mlx({"base_model.model.x.lora_A.default.weight": a}).keys() == {"x.lora_a"}


def test_scale_follows_peft_rules() -> None:
    cfg = {"lora_alpha": 16, "alpha_pattern": {"v_proj": 4}}
    assert adapters.lora_scale(cfg, "model.layers.0.self_attn.q_proj", 8) == 2.0
    assert adapters.lora_scale(cfg, "model.layers.0.self_attn.v_proj", 8) == 0.5
    assert adapters.lora_scale({"lora_alpha": 16, "use_rslora": True}, "x.q_proj", 4) == 8.0


def test_non_lora_tensors_are_refused(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not a plain LoRA"):
        adapters.peft_to_mlx({"base_model.model.x.lora_magnitude_vector.weight": np.zeros(3)})
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "use_dora": True}))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="DoRA"):
        adapters.read_peft_adapter(tmp_path)
    with pytest.raises(UserError, match="not a PEFT adapter folder"):
        adapters.read_peft_adapter(tmp_path / "nope")


# ---------------------------------------------------------------- across frameworks

# The numpy tests above run anywhere; these need both frameworks.
frameworks = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("mlx", "mlx_lm", "torch", "peft")),
    reason="needs the mlx and torch extras (pip install 'qlocal[mlx,torch]')")


def _cfg(model: Path, tmp: Path, backend: str, **lora: object) -> config_mod.Config:
    sets = {"model.name": str(model), "data.path": str(DATA), "run.output_dir": str(tmp), "train.backend": backend,
            **({"train.dtype": "float32"} if backend == "torch" else {}), **{f"lora.{k}": v for k, v in lora.items()}}
    return config_mod.build(sets=[f"{k}={v}" for k, v in sets.items()])


def _trained(backend_name: str, model_dir: Path, tmp: Path, steps: int = 8, **lora: object) -> tuple[Path, object]:
    from qlocal.backends.select import create_backend

    b = create_backend(backend_name)
    b.setup(model_dir, _cfg(model_dir, tmp, backend_name, **lora))
    batches = sample_batches(model_dir, n=3, max_len=96)
    for i in range(steps):
        b.train_step([batches[i % len(batches)]], 2e-2)
    out = tmp / f"{backend_name}-adapter"
    b.save_adapter(out)
    return out, b


def _ids(model_dir: Path) -> np.ndarray:
    return sample_batches(model_dir, n=1, max_len=96)[0]["input_ids"][:2, :48]


def _torch_logits(model_dir: Path, ids: np.ndarray, adapter: Path | None) -> np.ndarray:
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    if adapter is not None:
        model = peft.PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids)).logits.float().numpy()


def _mlx_model(model_dir: Path, adapter: Path | None):  # type: ignore[no-untyped-def]
    from qlocal.backends.mlx_infer import load_mlx_model, load_peft_adapter_into_mlx

    model, _ = load_mlx_model(model_dir)
    if adapter is not None:
        load_peft_adapter_into_mlx(model, adapter)
    model.eval()
    return model


def _mlx_logits(model_dir: Path, ids: np.ndarray, adapter: Path | None) -> np.ndarray:
    import mlx.core as mx

    return np.array(_mlx_model(model_dir, adapter)(mx.array(ids)).astype(mx.float32))


def _assert_same_movement(model_dir: Path, adapter: Path) -> None:
    ids = _ids(model_dir)
    t0, t1 = _torch_logits(model_dir, ids, None), _torch_logits(model_dir, ids, adapter)
    m0, m1 = _mlx_logits(model_dir, ids, None), _mlx_logits(model_dir, ids, adapter)
    base_gap, adapted_gap, moved = np.abs(m0 - t0).max(), np.abs(m1 - t1).max(), np.abs(t1 - t0).max()
    assert moved > 100 * adapted_gap, (moved, adapted_gap)  # the adapter really changes the model
    assert adapted_gap <= 2 * base_gap + EPS, (adapted_gap, base_gap)
    assert np.array_equal(m1.argmax(-1), t1.argmax(-1))


@frameworks
@pytest.mark.parametrize("arch,lora", [("qwen2", {}), ("llama", {"rank": 4, "alpha": 32, "layers": 1}),
                                       ("gemma3", {"target_modules": "q_proj,v_proj,down_proj"}), ("qwen3moe", {})])
def test_torch_adapter_in_mlx_moves_logits_as_in_torch(arch: str, lora: dict, tiny_model_dir, tmp_path: Path) -> None:
    model_dir = tiny_model_dir(arch)
    adapter, _ = _trained("torch", model_dir, tmp_path, **lora)
    _assert_same_movement(model_dir, adapter)


@frameworks
@pytest.mark.parametrize("arch,lora", [("qwen2", {"rank": 4, "alpha": 32}), ("llama", {}),
                                       ("gemma3", {"layers": 1}), ("qwen3moe", {})])
def test_mlx_adapter_in_peft_moves_logits_as_in_mlx(arch: str, lora: dict, tiny_model_dir, tmp_path: Path) -> None:
    model_dir = tiny_model_dir(arch)
    import peft

    adapter, _ = _trained("mlx", model_dir, tmp_path, **lora)
    cfg = peft.PeftConfig.from_pretrained(str(adapter))
    assert cfg.r == lora.get("rank", 8) and cfg.lora_alpha == lora.get("alpha", 16)
    _assert_same_movement(model_dir, adapter)


@frameworks
def test_mlx_peft_mlx_round_trip_is_exact(tiny_model_dir, tmp_path: Path) -> None:
    import mlx.core as mx

    model_dir = tiny_model_dir("qwen2")
    adapter, backend = _trained("mlx", model_dir, tmp_path, steps=4, rank=4, alpha=12, dropout=0.1)
    trained = backend.lora_weights()  # type: ignore[attr-defined]
    reloaded = _mlx_model(model_dir, adapter)
    from mlx.utils import tree_flatten

    got = {k: np.array(v) for k, v in tree_flatten(reloaded.parameters()) if ".lora_" in k}
    assert got.keys() == trained.keys()
    assert all(np.array_equal(got[k], trained[k]) for k in trained)
    ids = mx.array(_ids(model_dir))
    backend.model.eval()  # type: ignore[attr-defined]
    assert np.array_equal(np.array(reloaded(ids)), np.array(backend.model(ids)))  # type: ignore[attr-defined]
    assert reloaded.layers[0].self_attn.q_proj.scale == 3.0


@frameworks
def test_mlx_adapter_has_exactly_peft_names(tiny_model_dir, tmp_path: Path) -> None:
    """Same model + LoRA settings: the MLX backend writes the very tensor names and shapes PEFT writes."""
    from safetensors.numpy import load_file

    model_dir = tiny_model_dir("gemma3")
    names = {}
    for backend in ("torch", "mlx"):
        adapter, _ = _trained(backend, model_dir, tmp_path, steps=1, layers=1)
        names[backend] = {k: v.shape for k, v in load_file(str(adapter / "adapter_model.safetensors")).items()}
        cfg = json.loads((adapter / "adapter_config.json").read_text())
        assert (cfg["r"], cfg["lora_alpha"], cfg["layers_to_transform"]) == (8, 16, [1])
    assert names["mlx"] == names["torch"]


@frameworks
def test_peft_patterns_load_into_mlx(tiny_model_dir, tmp_path: Path) -> None:
    """rank_pattern / alpha_pattern / rsLoRA adapters made by PEFT itself keep their meaning in MLX."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    model_dir = tiny_model_dir("llama")
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], use_rslora=True,
                          rank_pattern={"v_proj": 2}, alpha_pattern={"up_proj": 2}, init_lora_weights=False)
    peft.get_peft_model(base, cfg).save_pretrained(str(tmp_path / "pat"))
    _assert_same_movement(model_dir, tmp_path / "pat")


@frameworks
def test_torch_expert_adapter_is_refused_by_mlx(tiny_model_dir, tmp_path: Path) -> None:
    """Naming Qwen3-MoE's expert projections trains PEFT LoRA on the stacked experts on torch; MLX
    cannot apply that and says so in one line instead of loading half of it."""
    model_dir = tiny_model_dir("qwen3moe")
    adapter, _ = _trained("torch", model_dir, tmp_path, target_modules="q_proj,gate_proj,up_proj,down_proj")
    with pytest.raises(UserError, match="trains stacked parameters .*use --backend torch") as e:
        _mlx_model(model_dir, adapter)
    assert "\n" not in str(e.value)


@frameworks
def test_mismatched_adapter_is_refused(tiny_model_dir, tmp_path: Path) -> None:
    model_dir = tiny_model_dir("qwen2")
    cfg = adapters.peft_config(2, 4, ["q_proj"], None, str(model_dir))
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    adapters.write_peft_adapter(tmp_path / "wide", cfg, {f"{q}.lora_A.weight": np.zeros((2, 32), np.float32),
                                                        f"{q}.lora_B.weight": np.zeros((64, 2), np.float32)})
    with pytest.raises(UserError, match="wrong base model"):
        _mlx_model(model_dir, tmp_path / "wide")
    far = "base_model.model.model.layers.7.self_attn.q_proj"
    adapters.write_peft_adapter(tmp_path / "far", cfg, {f"{far}.lora_A.weight": np.zeros((2, 64), np.float32),
                                                       f"{far}.lora_B.weight": np.zeros((64, 2), np.float32)})
    with pytest.raises(UserError, match="not a linear layer of this model"):
        _mlx_model(model_dir, tmp_path / "far")
