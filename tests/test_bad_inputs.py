"""A corpus of bad inputs: each ends in one clear line naming the file/line/key and the fix,
exit status 2, no traceback, and no run folder left behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
GOOD = '{"instruction": "Say hi", "output": "Hi!"}\n'


def _fails_cleanly(res, out: Path, *needles: str) -> str:
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    assert "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip() and not ln.startswith("warning:")]
    assert len(lines) == 1, res.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    assert not out.exists() or not any(out.iterdir()), f"left behind: {list(out.iterdir())}"
    return lines[0]


BAD_DATA = {
    "malformed_json": (GOOD + '{"instruction": "x", "output": \n', ":2", "JSON"),
    "missing_field": (GOOD + '{"instruction": "x"}\n', ":2", ""),
    "mistyped_field": (GOOD + '{"instruction": "x", "output": 5}\n', ":2", "output"),
    "empty_file": ("", "empty", ""),
    "mixed_formats": (GOOD + '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n',
                      ":2", "messages"),
    "not_an_object": (GOOD + '[1, 2]\n', ":2", ""),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_data_file(case: str, qlocal_cli, tiny_model_dir, tmp_path: Path) -> None:
    text, *needles = BAD_DATA[case]
    data = tmp_path / f"{case}.jsonl"
    data.write_text(text, encoding="utf-8")
    out = tmp_path / "runs"
    res = qlocal_cli("train", "--model", tiny_model_dir("qwen2"), "--data", data, "--output-dir", out, "--iters", "1")
    _fails_cleanly(res, out, str(data), *[n for n in needles if n])


def test_non_utf8_bytes_name_the_line(qlocal_cli, tiny_model_dir, tmp_path: Path) -> None:
    data = tmp_path / "latin1.jsonl"
    data.write_bytes(GOOD.encode() + b'{"instruction": "caf\xe9", "output": "x"}\n')
    out = tmp_path / "runs"
    res = qlocal_cli("train", "--model", tiny_model_dir("qwen2"), "--data", data, "--output-dir", out, "--iters", "1")
    _fails_cleanly(res, out, f"{data}:2", "UTF-8")


def test_skip_bad_lines_counts_and_trains(qlocal_cli, tiny_model_dir, tmp_path: Path) -> None:
    data = tmp_path / "some_bad.jsonl"
    data.write_text(GOOD * 6 + "{oops\n" + GOOD * 2, encoding="utf-8")
    res = qlocal_cli("train", "--model", tiny_model_dir("qwen2"), "--data", data, "--output-dir", tmp_path / "runs",
                     "--name", "r", "--iters", "2", "--skip-bad-lines", "--quiet")
    assert res.returncode == 0, res.stderr
    assert "skipped 1 bad records" in res.stderr and f"{data}:7" in res.stderr


def test_long_records_warn_or_drop(qlocal_cli, tiny_model_dir, tmp_path: Path) -> None:
    data = tmp_path / "long.jsonl"
    long = json.dumps({"instruction": "Repeat", "output": "word " * 400})
    data.write_text(GOOD * 4 + long + "\n", encoding="utf-8")
    args = ["train", "--model", tiny_model_dir("qwen2"), "--data", data, "--output-dir", tmp_path / "runs",
            "--iters", "1", "--max-seq-len", "128", "--quiet"]
    res = qlocal_cli(*args, "--name", "t")
    assert res.returncode == 0, res.stderr
    assert "truncated 1 examples longer than data.max_seq_len=128" in res.stderr
    res = qlocal_cli(*args, "--name", "d", "--drop-long")
    assert res.returncode == 0, res.stderr
    assert "dropped 1 examples" in res.stderr
    assert "train_examples: 4" in (tmp_path / "runs/d/config.yaml").read_text()


@pytest.mark.parametrize("args, needles", [
    (["--set", "train.lr=fast"], ["train.lr", "float"]),
    (["--set", "train.backend=jax"], ["train.backend", "auto, torch, mlx"]),
    (["--set", "data.val_split=1.5"], ["data.val_split"]),
    (["--set", "lora.rank=-1"], ["lora.rank", "positive"]),
    (["--model", "no-such-org/no-such-model"], ["no-such-org/no-such-model", "local folder"]),
    (["--model", "./missing-model-folder"], ["missing-model-folder"]),
])
def test_bad_config_and_models(args: list[str], needles: list[str], qlocal_cli, tmp_path: Path) -> None:
    out = tmp_path / "runs"
    res = qlocal_cli("train", "--data", REPO / "data/alpaca_sample.jsonl", "--output-dir", out, *args)
    _fails_cleanly(res, out, *needles)


def test_unwritable_output_folder(qlocal_cli, tiny_model_dir, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    res = qlocal_cli("train", "--model", tiny_model_dir("qwen2"), "--data", REPO / "data/alpaca_sample.jsonl",
                     "--output-dir", blocker / "runs", "--iters", "1")
    _fails_cleanly(res, tmp_path / "nothing", "--output-dir", "a-file")


def test_pickle_weights_refused_unless_allowed(qlocal_cli, tmp_path: Path) -> None:
    model = tmp_path / "pickled"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "pytorch_model.bin").write_bytes(b"not really")
    out = tmp_path / "runs"
    res = qlocal_cli("train", "--model", model, "--data", REPO / "data/alpaca_sample.jsonl", "--output-dir", out)
    _fails_cleanly(res, out, "pickle", "--allow-pickle")


def test_resume_with_a_different_base_is_refused(qlocal_cli, tiny_model_dir, tmp_path: Path) -> None:
    model = tmp_path / "base"
    shutil.copytree(tiny_model_dir("qwen2"), model)
    out = tmp_path / "runs"
    res = qlocal_cli("train", "--model", model, "--data", REPO / "data/alpaca_sample.jsonl", "--output-dir", out,
                     "--name", "r", "--iters", "2", "--quiet")
    assert res.returncode == 0, res.stderr
    cfg = json.loads((model / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-5 if cfg.get("rms_norm_eps") != 1e-5 else 1e-6
    (model / "config.json").write_text(json.dumps(cfg))
    res = qlocal_cli("train", "--resume", out / "r")
    assert res.returncode == 2 and "different base model" in res.stderr and "Traceback" not in res.stderr


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(qlocal_cli, tiny_model_dir, tmp_path: Path) -> None:
    out = tmp_path / "runs"
    res = qlocal_cli("train", "--model", tiny_model_dir("qwen2"), "--data", REPO / "data/alpaca_sample.jsonl",
                     "--output-dir", out, "--name", "nan", "--iters", "20", "--save-every", "1",
                     "--lr", "1e30", "--max-grad-norm", "0", "--quiet")
    assert res.returncode == 2, res.stderr
    assert "lower the learning rate" in res.stderr and "Traceback" not in res.stderr
    assert "last good checkpoint" in res.stderr
    assert (out / "nan" / "checkpoints").is_dir() and any((out / "nan" / "checkpoints").iterdir())
    assert not (out / "nan" / "adapter").exists()
