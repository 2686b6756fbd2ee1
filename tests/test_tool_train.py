"""A tool-calling dataset in OpenAI form and in ShareGPT form trains on torch and on MLX with the same
ids and masks: `qlocal train`'s data path gives identical examples for both files, and the four runs
(two files x two backends) start from the same loss, the base model's under the shared token contract."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from train_helpers import REPO, losses, train_cfg

QWEN25 = REPO / "tests/assets/chat_templates/qwen2.5.jinja"
FILES = {"openai": REPO / "data/tools_sample.jsonl", "sharegpt": REPO / "data/tools_sample_sharegpt.json"}


def _cfg(backend: str, model: Path, out: Path, name: str, data: Path):  # type: ignore[no-untyped-def]
    return train_cfg(backend, model, out, name, iters=2, batch_size=2, **{
        "data.path": str(data), "model.chat_template": str(QWEN25), "data.max_seq_len": 1024, "train.save_every": 100})


def test_openai_and_sharegpt_tool_data_train_alike_on_torch_and_mlx(tiny_model_dir, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    from qlocal.hf import load_tokenizer
    from qlocal.train import train
    from qlocal.train_data import prepare_data

    model = tiny_model_dir("qwen2")
    tok = load_tokenizer(model)
    prepared = {k: prepare_data(_cfg("torch", model, tmp_path, k, f), tok, str(QWEN25)) for k, f in FILES.items()}
    a, b = (prepared[k].train for k in FILES)
    assert len(a) == len(b) >= 50
    assert [(e.input_ids, e.loss_mask) for e in a] == [(e.input_ids, e.loss_mask) for e in b]
    calls = [e for e in a if "<tool_call>" in tok.decode([t for t, m in zip(e.input_ids, e.loss_mask) if m])]
    assert len(calls) >= 40  # tool-call text is trained

    backends = ["torch"]
    try:
        import mlx.core  # noqa: F401
        import mlx_lm  # noqa: F401
        backends.append("mlx")
    except ImportError:
        pass
    first = {}
    for backend in backends:
        for kind, path in FILES.items():
            run = train(_cfg(backend, model, tmp_path / "runs", f"{backend}-{kind}", path), quiet=True)
            ls = losses(run)
            assert len(ls) == 2 and all(np.isfinite(ls)), (backend, kind, ls)
            first[backend, kind] = ls[0]
    ref = first["torch", "openai"]
    assert all(abs(v - ref) < 1e-4 for v in first.values()), first
    if len(backends) == 1:
        pytest.skip("mlx is not installed: torch runs checked, the MLX half skipped")
