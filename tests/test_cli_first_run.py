"""What a new user hits first, in an empty folder: every cheap check (data file, its first bad line,
the target, the model name) fails in one line before any model converts, downloads or loads."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from qlocal import models
from qlocal.cli import main

REPO = Path(__file__).resolve().parent.parent
SAMPLE = str(REPO / "data/alpaca_sample.jsonl")


@pytest.fixture
def empty_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working folder where converting the built-in alias (or loading any model) fails the test."""
    monkeypatch.chdir(tmp_path)
    for step in ("_ensure_gguf", "_convert_gguf", "_resolve_hub"):
        monkeypatch.setattr(models, step, lambda *a, _s=step, **k: pytest.fail(f"{_s} ran before a cheap check"))
    import qlocal.infer

    monkeypatch.setattr(qlocal.infer, "open_backend", lambda *a: pytest.fail("a backend opened before a cheap check"))
    return tmp_path


def _error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """The one stderr line of `qlocal argv` (exit 2)."""
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    assert e.value.code == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    return lines[0]


needs_alias = pytest.mark.skipif(
    importlib.util.find_spec(models.ALIASES["gemma-3-270m"].package) is None,
    reason="the alias's package (qlocal[quickstart]) is not installed: its install hint comes first")

ALIAS_COMMANDS = [
    ("train", "--model", "gemma-3-270m", "--data"),
    ("eval", "gemma-3-270m", "--data"),
    ("data", "check", "--model", "gemma-3-270m"),
]


@needs_alias
@pytest.mark.parametrize("argv", ALIAS_COMMANDS, ids=lambda a: a[0])
def test_data_errors_come_before_the_alias_converts(argv: tuple[str, ...], empty_folder: Path, capsys) -> None:
    assert _error(capsys, *argv, "my.jsonl").startswith("error: my.jsonl: file not found; check data.path")
    # An empty line is skipped, and the bad line after it is named by its own number.
    Path("bad.jsonl").write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "a", "output": \n')
    assert _error(capsys, *argv, "bad.jsonl").startswith("error: bad.jsonl:3: not valid JSON")
    assert sorted(p.name for p in empty_folder.iterdir()) == ["bad.jsonl"]  # no models/, outputs/, nothing


@needs_alias
def test_csv_missing_column_and_format_error_before_the_model(empty_folder: Path, capsys) -> None:
    Path("d.csv").write_text("instruction,answer\nhi,there\n")
    line = _error(capsys, "train", "--model", "gemma-3-270m", "--data", "d.csv")
    assert line.startswith("error: d.csv:2: cannot tell the format from the keys (answer, instruction)")
    assert not Path("models").exists() and not Path("outputs").exists()


def test_train_model_name_of_no_kind_before_the_data(empty_folder: Path, capsys) -> None:
    line = _error(capsys, "train", "--model", "./my-model", "--data", "my.jsonl")
    assert line == ("error: ./my-model: no such model folder; give a local HF folder, a hub id like "
                    "Qwen/Qwen2.5-0.5B-Instruct, or an alias (gemma-3-270m)")


@pytest.mark.parametrize("cmd, rest", [(("chat",), ()), (("generate",), ("--prompt", "hi")), (("serve",), ()),
                                       (("export",), ()), (("eval",), ("--data", "bad.jsonl")),
                                       (("train", "--resume"), ())], ids=lambda a: " ".join(a))
def test_a_missing_run_path_lists_the_runs(cmd: tuple[str, ...], rest: tuple[str, ...], empty_folder: Path,
                                           capsys) -> None:
    # outputs/ not there yet: the path is a run path, never a hub id ("cannot download ... offline")
    assert _error(capsys, *cmd, "outputs/x", *rest) == ("error: outputs/x: no such run folder, and outputs/ does "
                                                       "not exist here; train one with qlocal train")
    Path("outputs").mkdir()
    assert _error(capsys, *cmd, "outputs/x", *rest) == "error: outputs/x: no such run folder; outputs/ holds no runs or exports"
    for name in ("r2", "r1"):
        (Path("outputs") / name).mkdir()
        (Path("outputs") / name / "config.yaml").write_text("{}")
    assert _error(capsys, *cmd, "outputs/x", *rest) == "error: outputs/x: no such run folder; outputs/ holds r1, r2"
    Path("runs").mkdir()  # --output-dir runs: a first part that is a local folder makes it a path too
    assert _error(capsys, *cmd, "runs/x", *rest) == "error: runs/x: no such folder"
    (Path("runs") / "a").mkdir()
    (Path("runs") / "a" / "config.yaml").write_text("{}")
    assert _error(capsys, *cmd, "runs/x", *rest) == "error: runs/x: no such folder; runs/ holds a"


def test_hub_ids_still_reach_the_hub(empty_folder: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    asked = []

    def hub(repo_id: str, *a, **k):
        asked.append(repo_id)
        raise models.UserError(f"{repo_id}: stop here")

    monkeypatch.setattr(models, "_resolve_hub", hub)
    assert _error(capsys, "chat", "Qwen/Qwen2.5-0.5B-Instruct") == "error: Qwen/Qwen2.5-0.5B-Instruct: stop here"
    assert asked == ["Qwen/Qwen2.5-0.5B-Instruct"]


def _run(root: Path, name: str, *, step: int | None, adapter: bool = False) -> Path:
    run = root / "outputs" / name
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("{}")
    if step is not None:
        (run / "checkpoints" / f"step-{step}").mkdir()
        (run / "checkpoints" / f"step-{step}" / "state.json").write_text("{}")
    if adapter:
        (run / "adapter").mkdir()
        (run / "adapter" / "adapter_config.json").write_text("{}")
    return run


def test_export_or_chat_of_an_unfinished_run(empty_folder: Path, capsys) -> None:
    import os

    from qlocal import pidfile

    _run(empty_folder, "stopped", step=4)
    for cmd in ("export", "chat"):
        assert _error(capsys, cmd, "outputs/stopped") == (
            "error: outputs/stopped: training stopped at step 4 before the end, so there is no adapter/ yet; "
            "finish it with: qlocal train --resume outputs/stopped")
    running = _run(empty_folder, "running", step=None)
    with pidfile.holding(running):  # what train holds while it runs
        line = _error(capsys, "export", "outputs/running")
    assert line.startswith(f"error: outputs/running: is still training (pid {os.getpid()}); its adapter/ is written")
    assert _error(capsys, "export", "outputs/running").endswith(
        "training ended before its first checkpoint, so there is nothing to use; train it again")


def test_chat_on_an_export_folder_without_a_gguf(empty_folder: Path, capsys) -> None:
    export = empty_folder / "export" / "r"
    (export / "fused").mkdir(parents=True)
    (export / "fused" / "config.json").write_text("{}")
    (export / "export.json").write_text(json.dumps({"run": "outputs/r", "files": {}}))
    assert _error(capsys, "chat", "export/r") == (
        "error: export/r: an export folder with no GGUF in it; give export/r/fused (an HF model folder), "
        "the run it came from, or export again with --gguf")


def test_help_is_whole_and_every_command_shows_an_example() -> None:
    from click.testing import CliRunner

    from qlocal.cli import cli

    top = CliRunner().invoke(cli, ["--help"], terminal_width=80)
    assert top.exit_code == 0
    listed = top.output.split("Commands:")[1]
    assert "..." not in listed  # each command's one line is whole, not cut at the terminal's width
    for line in ("qlocal train --model", "qlocal chat outputs/<run>", "qlocal export outputs/<run>", "ollama create"):
        assert line in top.output
    commands = [["train"], ["data", "check"], ["generate"], ["chat"], ["eval"], ["export"], ["serve"], ["studio"]]
    for argv in commands:
        out = CliRunner().invoke(cli, [*argv, "--help"], terminal_width=80).output
        assert f"qlocal {' '.join(argv)} " in out.split("Options:")[0], f"{argv}: no example in --help"


@needs_alias
def test_generate_input_file_bad_line_before_the_model(empty_folder: Path, capsys) -> None:
    Path("in.jsonl").write_text('{"prompt": "hi"}\n\n{"question": "hi"}\n')
    line = _error(capsys, "generate", "gemma-3-270m", "--input-file", "in.jsonl", "--output", "out.jsonl")
    assert line == 'error: in.jsonl:3: expected {"prompt": ...} or {"messages": [...]}'
    assert sorted(p.name for p in empty_folder.iterdir()) == ["in.jsonl"]


def test_csv_row_with_too_few_cells_is_named(tmp_path: Path) -> None:
    from qlocal.data.formats import load_samples
    from qlocal.errors import UserError

    path = tmp_path / "short.csv"
    path.write_text("instruction,input,output\nq1,,a1\nq2\nq3,,a3\n")
    with pytest.raises(UserError) as e:
        load_samples(str(path))
    assert str(e.value) == (f"{path}:3: fewer cells than the header has columns (no input, output); add the missing "
                            "cells (empty ones too: `a,` has two) or pass --skip-bad-lines")
    samples, stats = load_samples(str(path), skip_bad_lines=True)
    assert [s.messages[-1]["content"] for s in samples] == ["a1", "a3"]
    assert stats["skipped"] == 1 and stats["skipped_where"] == [f"{path}:3"]


@needs_alias
def test_compare_base_on_a_model_before_it_loads(empty_folder: Path, capsys) -> None:
    Path("t.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    assert _error(capsys, "eval", "gemma-3-270m", "--data", "t.jsonl", "--compare-base") == (
        "error: gemma-3-270m is a base model already; --compare-base needs a run folder (its base is known and "
        "the adapter can be switched off)")


def test_a_missing_gguf_file_is_a_missing_file(empty_folder: Path, capsys) -> None:
    assert _error(capsys, "chat", "model.gguf") == ("error: model.gguf: no such file; give a .gguf file, or the "
                                                    "export folder that holds one")
    assert _error(capsys, "serve", "model.gguf") == ("error: model.gguf: not a .gguf file or an export folder with "
                                                     "a GGUF; make one with qlocal export outputs/<run> --gguf")
