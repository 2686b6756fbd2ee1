"""The shared fixtures build loadable tiny models and run the CLI offline."""

from __future__ import annotations

import json

import pytest

from conftest import TINY_ARCHS


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_model_loads_and_gives_finite_logits(arch: str, tiny_model_dir, tokenizer_dir) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_model_dir(arch)
    assert (path / "config.json").is_file() and any(path.glob("*.safetensors"))
    assert tiny_model_dir(arch) == path  # cached per session
    tok = AutoTokenizer.from_pretrained(path)
    assert len(tok) == len(AutoTokenizer.from_pretrained(tokenizer_dir(arch)))
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.dtype == torch.float32
    ids = tok("Hello world, 123.", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok))
    assert torch.isfinite(logits).all()
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2 and cfg["hidden_size"] == 64
    assert cfg["vocab_size"] == len(tok)


def test_tiny_models_are_deterministic(tiny_model_dir, tmp_path) -> None:
    from safetensors.torch import load_file

    from conftest import make_tiny_model

    again = make_tiny_model("qwen2", tmp_path / "qwen2")
    a = load_file(next(tiny_model_dir("qwen2").glob("*.safetensors")))
    b = load_file(next(again.glob("*.safetensors")))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_tokenizer_dir_maps_llama_to_llama3(tokenizer_dir) -> None:
    assert tokenizer_dir("llama").name == "llama3"
    assert (tokenizer_dir("gemma3") / "tokenizer_config.json").is_file()


def test_environment_is_offline() -> None:
    import os

    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TRANSFORMERS_OFFLINE"] == "1"


def test_qlocal_cli_runs_offline_from_any_cwd(qlocal_cli, tmp_path) -> None:
    out = qlocal_cli("--help", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "Usage" in out.stdout
