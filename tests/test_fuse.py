"""Fuse: adapter merged into the 16-bit original base equals base+adapter; errors leave nothing behind."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

from export_helpers import make_run, to_dtype_copy

from qlocal.errors import UserError
from qlocal.export.fuse import fuse_run, probe_ids


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("arch", ["qwen2", "llama", "gemma3"])
def test_fused_equals_base_plus_adapter(arch: str, tiny_model_dir, tmp_path: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = tiny_model_dir(arch)
    before = _sha(base / "model.safetensors")
    run = make_run(base, tmp_path / "run")
    report = fuse_run(run, tmp_path / "fused")

    assert report.dtype == "float32" and report.probes == 3
    assert report.max_abs_logit_diff < 1e-4, report
    assert _sha(base / "model.safetensors") == before  # the base on disk is never modified
    out = tmp_path / "fused"
    assert (out / "model.safetensors").is_file() and not list(tmp_path.glob(".fused*"))
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.chat_template == (run / "chat_template.jinja").read_text()

    # Independent check: reload both from disk and compare, and make sure the adapter mattered.
    fused = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    plain = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    unmerged = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32), str(run / "adapter")).eval()
    ids = torch.tensor([probe_ids(tok, tok.chat_template)[0]])
    with torch.no_grad():
        a, b, c = fused(input_ids=ids).logits, unmerged(input_ids=ids).logits, plain(input_ids=ids).logits
    assert (a - b).abs().max() < 1e-4
    assert (a - c).abs().max() > 1e-2  # the adapter changes the model


def test_bf16_base_stays_bf16(tiny_model_dir, tmp_path: Path) -> None:
    base = to_dtype_copy(tiny_model_dir("qwen2"), tmp_path / "base-bf16", "bfloat16")
    run = make_run(base, tmp_path / "run")
    report = fuse_run(run, tmp_path / "fused")
    assert report.dtype == "bfloat16"
    import json

    assert json.loads((tmp_path / "fused" / "config.json").read_text())["dtype"] == "bfloat16"
    # The merge itself is exact in fp32; storing bf16 costs ~3 significant digits of the logits.
    assert report.max_abs_logit_diff_fp32 < 1e-4
    assert report.max_abs_logit_diff < 0.05 * max(1.0, report.max_abs_logit)


def test_not_a_run_and_missing_base(tiny_model_dir, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not a qlocal run folder"):
        fuse_run(tmp_path, tmp_path / "out")
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir("llama"), base)
    run = make_run(base, tmp_path / "run")
    shutil.rmtree(base)
    with pytest.raises(UserError, match="base model .* is gone"):
        fuse_run(run, tmp_path / "out")
    assert not (tmp_path / "out").exists()
