"""The command line: help, config layering, and one-line errors with exit status 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qlocal import config as config_mod
from qlocal.errors import UserError

REPO = Path(__file__).resolve().parent.parent
SAMPLE = str(REPO / "data/alpaca_sample.jsonl")


def _one_line_error(res) -> str:
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    return lines[0]


def test_help_lists_commands(qlocal_cli) -> None:
    res = qlocal_cli("--help")
    assert res.returncode == 0
    for cmd in ("train", "data", "doctor"):
        assert cmd in res.stdout
    res = qlocal_cli("train", "--help")
    for flag in ("--rank", "--alpha", "--quantize", "--resume", "--set", "--config", "--val-split",
                 "--grad-checkpointing", "--chat-template", "--target-modules", "--layers"):
        assert flag in res.stdout


def test_config_layers_defaults_yaml_flags_set(tmp_path: Path) -> None:
    yml = tmp_path / "c.yaml"
    yml.write_text("lora:\n  rank: 4\n  alpha: 32\ntrain:\n  lr: 1.0e-3\n  iters: 7\n")
    cfg = config_mod.build(str(yml), {"lora.alpha": 8.0, "train.lr": None}, ["train.lr=5e-4", "lora.target_modules=q_proj,v_proj"])
    assert cfg.lora.rank == 4          # YAML over default
    assert cfg.lora.alpha == 8.0       # flag over YAML
    assert cfg.train.lr == 5e-4        # --set over YAML (an unset flag does not override)
    assert cfg.train.iters == 7
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.train.batch_size == 4   # default


@pytest.mark.parametrize("sets, expected", [
    # a suggestion is always the whole key to type after --set
    (["lora.rnak=4"], "unknown config key 'lora.rnak' (did you mean 'lora.rank'?)"),
    (["lorra.rank=4"], "unknown config section 'lorra' (did you mean 'lora.rank'?)"),
    (["lorra.rnak=4"], "unknown config section 'lorra' (did you mean 'lora.rank'?)"),
    (["lorra.xyzzy=4"], "unknown config section 'lorra' (did you mean 'lora'?)"),
    (["train.rank=4"], "unknown config key 'train.rank' (did you mean 'lora.rank'?)"),
    (["lora.xyzzy=4"], "unknown config key 'lora.xyzzy' (known: lora.alpha, lora.dropout,"),
    (["name=m"], "'name' is not a config key; keys look like section.key (did you mean 'model.name' or 'run.name'?)"),
    (["lora.rank=four"], "'lora.rank' must be int"),
    (["train.quantize=3bit"], "'train.quantize' must be one of none, 4bit, 8bit"),
    (["rank=4"], "keys look like section.key"),
    (["lora.rank"], "expected key=value"),
    (["train.batch_size=0"], "'train.batch_size' must be positive"),
])
def test_bad_config_values_are_named(sets: list[str], expected: str) -> None:
    with pytest.raises(UserError, match=None) as e:
        config_mod.build(sets=sets)
    assert expected in str(e.value)


def test_yaml_errors_name_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora:\n  rank: 4\n   alpha: [\n")
    with pytest.raises(UserError) as e:
        config_mod.build(str(bad))
    assert str(bad) in str(e.value) and "YAML" in str(e.value)
    unknown = tmp_path / "u.yaml"
    unknown.write_text("train:\n  learning_rate: 1e-4\n")
    with pytest.raises(UserError) as e:
        config_mod.build(str(unknown))
    assert str(unknown) in str(e.value) and "train.learning_rate" in str(e.value)


def test_cli_errors_are_one_line_exit_2(qlocal_cli, tmp_path: Path) -> None:
    line = _one_line_error(qlocal_cli("train", "--set", "lora.rnak=4", "--data", SAMPLE))
    assert line.endswith("unknown config key 'lora.rnak' (did you mean 'lora.rank'?)")
    line = _one_line_error(qlocal_cli("train", "--model", str(tmp_path / "nope"), "--data", SAMPLE,
                                      "--output-dir", str(tmp_path)))
    assert "nope" in line
    line = _one_line_error(qlocal_cli("train", "--config", str(tmp_path / "missing.yaml")))
    assert "missing.yaml" in line
    line = _one_line_error(qlocal_cli("train", "--resume", str(tmp_path), "--rank", "4"))
    assert "--resume" in line and "--rank" in line
    line = _one_line_error(qlocal_cli("train", "--resume", str(tmp_path)))
    assert "not a qlocal run folder" in line
    assert not any(tmp_path.iterdir())
    exported = tmp_path / "export" / "r"  # an export folder where a run folder is meant: name its run
    exported.mkdir(parents=True)
    (exported / "export.json").write_text(json.dumps({"run": str(tmp_path / "outputs" / "r")}))
    for args in (("export", str(exported)), ("train", "--resume", str(exported))):
        line = _one_line_error(qlocal_cli(*args))
        assert line.endswith(f"an export folder, not a run folder; give the run it was exported from: {tmp_path}/outputs/r")
    assert sorted(p.name for p in exported.iterdir()) == ["export.json"]
    (tmp_path / "outputs" / "r1").mkdir(parents=True)  # a mistyped run or export name: the ones that are there
    (tmp_path / "outputs" / "r1" / "config.yaml").write_text("{}")
    for args in (("chat", "outputs/r2"), ("generate", "outputs/r2", "--prompt", "hi"), ("serve", "export/r2"),
                 ("eval", "outputs/r2", "--data", SAMPLE)):
        line = _one_line_error(qlocal_cli(*args, cwd=tmp_path))
        assert line == (f"error: {args[1]}: "
                        + ("no such run folder; outputs/ holds r1" if "outputs" in args[1]
                           else "no such export folder; export/ holds r"))
    res = qlocal_cli("serve", str(tmp_path), "--port", "99999")  # was socket's OverflowError traceback
    assert res.returncode == 2 and "Traceback" not in res.stderr and "1<=x<=65535" in res.stderr


def test_bad_data_and_existing_run_folder(qlocal_cli, tiny_model_dir, tmp_path: Path) -> None:
    model = tiny_model_dir("qwen2")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n')
    out = tmp_path / "runs"
    line = _one_line_error(qlocal_cli("train", "--model", model, "--data", bad, "--output-dir", out,
                                      "--name", "r", "--iters", "1"))
    assert f"{bad}:2" in line
    assert not (out / "r").exists(), "a failed start must leave no run folder"
    ok = qlocal_cli("train", "--model", model, "--data", SAMPLE, "--output-dir", out, "--name", "r",
                    "--iters", "2", "--quiet")
    assert ok.returncode == 0, ok.stderr
    line = _one_line_error(qlocal_cli("train", "--model", model, "--data", SAMPLE, "--output-dir", out,
                                      "--name", "r", "--iters", "2"))
    assert "--overwrite" in line
    again = qlocal_cli("train", "--model", model, "--data", SAMPLE, "--output-dir", out, "--name", "r",
                       "--iters", "2", "--quiet", "--overwrite")
    assert again.returncode == 0, again.stderr
    resolved = (out / "r" / "config.yaml").read_text()
    assert "backend: torch" in resolved and "model_path:" in resolved and "chat_template: model" in resolved


def test_progress_and_summary_on_terminal(qlocal_cli, tiny_model_dir, tmp_path: Path) -> None:
    res = qlocal_cli("train", "--model", tiny_model_dir("gemma3"), "--data", SAMPLE, "--output-dir", tmp_path,
                     "--name", "p", "--iters", "4", "--val-split", "0.1", "--eval-every", "2")
    assert res.returncode == 0, res.stderr
    err = res.stderr
    assert "loss=" in err and "tok/s=" in err and "val=" in err and "4/4" in err
    assert "done: loss" in err and "qlocal export" in err
    rows = [json.loads(x) for x in (tmp_path / "p" / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "loss", "lr", "tokens_per_s", "peak_memory_mb"} <= rows[0].keys()


def test_data_check_prints_stats_and_marked_example(qlocal_cli, tiny_model_dir) -> None:
    res = qlocal_cli("data", "check", str(REPO / "data/messages_sample.jsonl"), "--model", tiny_model_dir("llama"),
                     "--max-seq-len", "64")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "messages" in out and "truncated" in out.lower() and "[[" in out


def test_doctor_runs(qlocal_cli) -> None:
    res = qlocal_cli("doctor")
    assert res.returncode == 0, res.stderr
    assert "torch" in res.stdout.lower() and "auto" in res.stdout.lower()
