"""Safety defaults: no remote code unless asked, no secrets in run files."""

from __future__ import annotations

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


def test_secrets_never_reach_run_files_and_remote_code_is_off(qlocal_cli, tiny_model_dir, tmp_path: Path) -> None:
    secret = "hf_SECRETtoken1234567890"
    res = qlocal_cli("train", "--model", tiny_model_dir("qwen2"), "--data", REPO / "data/alpaca_sample.jsonl",
                     "--output-dir", tmp_path, "--name", "s", "--iters", "2",
                     env={"HF_TOKEN": secret, "HUGGING_FACE_HUB_TOKEN": secret})
    assert res.returncode == 0, res.stderr
    assert secret not in res.stdout + res.stderr
    for f in (tmp_path / "s").rglob("*"):
        if f.is_file():
            assert secret.encode() not in f.read_bytes(), f
    cfg = yaml.safe_load((tmp_path / "s" / "config.yaml").read_text())
    assert cfg["model"]["trust_remote_code"] is False and cfg["model"]["allow_pickle"] is False
