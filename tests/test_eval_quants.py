"""`qlocal eval`'s stops metric and `--compare-quants`.

The model: a tiny Qwen2 trained (for real, 40 steps) on short answers until it answers with one
of them and <|im_end|>, so it ends its turn on its own. Every answer is at least
`shortest` tokens long: with --max-tokens = shortest none can end its turn inside the budget (the
end-of-turn token would be one more), with --max-tokens = longest + 1 every one does. The run is
exported to f16, q8_0 and q4_k_m and each file goes through llama.cpp (llama-cpp-python).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from qlocal.errors import UserError

pytest.importorskip("peft")
pytest.importorskip("llama_cpp")
pytest.importorskip("rouge_score")
pytest.importorskip("sacrebleu")

QA = [("Colour of the sky?", "blue sky"), ("Colour of grass?", "green grass"), ("Colour of snow?", "white snow"),
      ("Colour of coal?", "black coal"), ("Colour of blood?", "red blood"), ("Colour of the sun?", "yellow sun")]
QUANTS = ["f16", "q8_0", "q4_k_m"]


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory) -> dict[str, Any]:
    """A run that answers QA and ends its turn, its export (three GGUFs) and the answers' token lengths."""
    from transformers import AutoTokenizer

    from qlocal import config as config_mod
    from qlocal.export.pipeline import ExportOptions, export_run
    from qlocal.train import train

    root = tmp_path_factory.mktemp("quants")
    data = root / "qa.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
                            + "\n" for q, a in QA), encoding="utf-8")
    base = tiny_model_dir("qwen2")
    sets = {"model.name": base, "data.path": data, "run.output_dir": root / "out", "run.name": "qa",
            "train.backend": "torch", "train.dtype": "float32", "train.iters": 40, "train.batch_size": 6,
            "train.lr": 1e-2, "train.lr_schedule": "constant", "train.save_every": 1000, "lora.rank": 16,
            "lora.alpha": 32}
    run = train(config_mod.build(sets=[f"{k}={v}" for k, v in sets.items()]), quiet=True)
    export = root / "export"
    export_run(run, ExportOptions(quants=QUANTS, out_dir=export, verify=False), echo=lambda *_: None)
    tok = AutoTokenizer.from_pretrained(str(base))
    def count(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    return {"run": run, "export": export, "data": data, "lengths": [count(a) for _, a in QA], "count": count}


def _eval(target: Path | str, data: Path, max_tokens: int, backend: str | None = None) -> dict[str, Any]:
    from qlocal.evaluate import EvalOptions, evaluate

    return evaluate(str(target), EvalOptions(data=str(data), max_tokens=max_tokens, backend=backend), quiet=True)


def test_stops_is_one_for_a_model_that_ends_its_turn_and_zero_within_too_few_tokens(trained) -> None:
    lengths = trained["lengths"]
    shortest, longest = min(lengths), max(lengths)
    assert shortest >= 2
    for target in (trained["run"], trained["export"] / "model-f16.gguf"):
        free = _eval(target, trained["data"], longest + 1)
        m, said = free["metrics"], [s["prediction"] for s in free["samples"]]
        # It learnt to give one of the answers (not always the right one: 64 wide) and to end there.
        assert set(said) <= {a for _, a in QA}, said
        # Each ended its turn right after its answer: the stop token within the budget, not counted.
        assert m["stops"] == 1.0
        assert m["answer_tokens"] == pytest.approx(sum(map(trained["count"], said)) / len(said))
        cut = _eval(target, trained["data"], shortest)["metrics"]
        assert cut["stops"] == 0.0 and cut["answer_tokens"] == shortest  # ran out of tokens: none ended
    from qlocal.evaluate import table

    out = table(free)
    assert "stops" in out.split("answer_tokens")[0] and "stops: share of answers that ended their turn" in out


def test_gguf_stops_agree_with_llama_cpp_pythons_own_chat_completion(trained) -> None:
    """llama-cpp-python's own chat completion (its template handler, sampler and stop rule) gives
    the same answers, ending ("stop") or running out ("length") where eval says they do."""
    from infer_helpers import greedy_answer

    gguf = trained["export"] / "model-q8_0.gguf"
    for budget in (max(trained["lengths"]) + 1, min(trained["lengths"])):
        report = _eval(gguf, trained["data"], budget)
        theirs = [greedy_answer(gguf, q, budget) for q, _ in QA]
        assert [s["prediction"] for s in report["samples"]] == [c["message"]["content"].strip() for c in theirs]
        assert report["metrics"]["stops"] == sum(c["finish_reason"] == "stop" for c in theirs) / len(QA)


def test_stops_on_mlx_equal_torch(trained) -> None:
    pytest.importorskip("mlx.core")
    pytest.importorskip("mlx_lm")
    longest = max(trained["lengths"])
    for budget in (longest + 1, min(trained["lengths"])):
        mlx = _eval(trained["run"], trained["data"], budget, backend="mlx")["metrics"]
        torch_ = _eval(trained["run"], trained["data"], budget, backend="torch")["metrics"]
        assert (mlx["stops"], mlx["answer_tokens"]) == (torch_["stops"], torch_["answer_tokens"])


@pytest.mark.slow
def test_compare_quants_rows_match_single_evals(trained, qlocal_cli, tmp_path: Path) -> None:
    from qlocal.quant_eval import LOSS_TOLERANCE, STOPS_TOLERANCE, recommend

    export, data = trained["export"], trained["data"]
    budget = max(trained["lengths"]) + 1
    res = qlocal_cli("eval", export, "--data", data, "--compare-quants", "--max-tokens", budget, "--quiet",
                     "--report", tmp_path / "q.json")
    assert res.returncode == 0, res.stderr
    report = json.loads((tmp_path / "q.json").read_text())
    names = [r["target"] for r in report["rows"]]
    files = json.loads((export / "export.json").read_text())["files"]
    assert names[0] == "run qa" and sorted(names[1:]) == sorted(f["file"] for f in files.values())
    sizes = [r["bytes"] for r in report["rows"][1:]]
    assert sizes == sorted(sizes, reverse=True) and sizes == [(export / n).stat().st_size for n in names[1:]]
    run_row = report["rows"][0]
    assert run_row["stops"] == 1.0 and run_row["agree_rouge_l"] is None
    for row in report["rows"][1:]:
        single = _eval(export / row["target"], data, budget)["metrics"]  # `qlocal eval <file>` alone
        for key in ("loss", "perplexity", "stops", "answer_tokens", "rouge_l"):
            assert row[key] == pytest.approx(single[key], rel=1e-9), (row["target"], key)
        assert row["delta_loss"] == pytest.approx(row["loss"] - run_row["loss"], rel=1e-9)
        assert 0.0 <= row["agree_same"] <= 1.0 and 0.0 <= row["agree_rouge_l"] <= 1.0
    f16 = next(r for r in report["rows"] if r["quant"] == "f16")
    assert abs(f16["delta_loss"]) < 1e-2 and f16["agree_same"] == 1.0  # 16-bit answers as the run does
    # The printed table: a row per model, then the recommendation the report holds.
    lines = res.stdout.splitlines()
    for name in names:
        assert any(ln.startswith(name + " ") for ln in lines), name
    rec = report["recommendation"]
    assert rec == recommend(report["rows"][1:], run_row) and rec["line"] in lines
    assert f"{LOSS_TOLERANCE} nats/token" in rec["line"] and f"- {STOPS_TOLERANCE}" in rec["line"]
    if rec["file"] is not None:
        chosen = next(r for r in report["rows"] if r["target"] == rec["file"])
        assert chosen["delta_loss"] <= LOSS_TOLERANCE and chosen["stops"] >= run_row["stops"] - STOPS_TOLERANCE
    assert (export / "eval-qa-quants.json").exists() is False  # --report was given


# ---- the recommendation, on crafted rows ---------------------------------------------------------


def _r(name: str, size: int | None, loss: float | None, stops: float | None, ref_loss: float = 1.0) -> dict[str, Any]:
    return {"target": name, "bytes": size, "loss": loss, "stops": stops,
            "delta_loss": None if loss is None else loss - ref_loss}


REF = _r("run r", None, 1.0, 1.0)


def test_recommend_smallest_file_within_both_tolerances() -> None:
    from qlocal.quant_eval import recommend

    rows = [_r("f16", 1000, 1.0001, 1.0), _r("q8_0", 530, 1.003, 1.0), _r("q4_k_m", 300, 1.04, 0.96),
            _r("q3_k_m", 250, 1.2, 1.0), _r("q2_k", 200, 1.01, 0.8)]
    rec = recommend(rows, REF)
    assert rec["file"] == "q4_k_m"  # q3_k_m's loss and q2_k's stops are out, smaller as they are
    assert rec["line"].startswith("recommended: q4_k_m (300 B), the smallest file with loss within 0.05 nats/token")
    assert "stops 0.96 vs 1.00" in rec["line"]
    # A file that rambles more than one answer in 20 beyond the run is out even with a perfect loss.
    assert recommend([_r("f16", 1000, 1.0, 1.0), _r("q4", 300, 1.0, 0.9)], REF)["file"] == "f16"
    # Without generation (--no-generate) only the loss is compared, and the line says so.
    rec = recommend([_r("f16", 1000, 1.0, None), _r("q4", 300, 1.01, None)], _r("run r", None, 1.0, None))
    assert rec["file"] == "q4" and "stops not compared" in rec["line"]


def test_recommend_none_says_what_to_try() -> None:
    from qlocal.quant_eval import recommend

    rec = recommend([_r("q8_0", 500, 1.02, 0.5), _r("q4_k_m", 300, 1.03, 0.4)], REF)
    assert rec["file"] is None and "end their turn less often" in rec["line"] and "train" in rec["line"]
    rec = recommend([_r("q4_k_m", 300, 1.3, 1.0)], REF)
    assert rec["file"] is None and "even the largest, q4_k_m, is +0.3000 nats/token off" in rec["line"]
    rec = recommend([_r("q4_k_m", 300, 1.3, 1.0)], _r("run r", None, None, 1.0))
    assert rec["file"] is None and "no loss" in rec["line"]


# ---- what --compare-quants refuses ---------------------------------------------------------------


def test_bad_export_folders_are_one_line(trained, qlocal_cli, tmp_path: Path) -> None:
    from qlocal.quant_eval import export_files

    data = trained["data"]
    res = qlocal_cli("eval", trained["run"], "--data", data, "--compare-quants")
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert "a run folder; --compare-quants takes the export folder of it" in res.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="not an export folder \\(no export.json\\)"):
        export_files(str(empty))
    (empty / "export.json").write_text("[1, 2")
    with pytest.raises(UserError, match="not an export summary qlocal wrote"):
        export_files(str(empty))
    (empty / "export.json").write_text(json.dumps({"run": str(trained["run"]), "files": {"q8_0": {"file": "gone.gguf"}}}))
    with pytest.raises(UserError, match="no GGUF of export.json is there"):
        export_files(str(empty))
    with pytest.raises(UserError, match="no such"):
        export_files(str(tmp_path / "nope"))
    # A run that is gone leaves the largest GGUF as the reference, said in the notes.
    (empty / "m.gguf").symlink_to(trained["export"] / "model-q8_0.gguf")
    (empty / "export.json").write_text(json.dumps({"run": str(tmp_path / "deleted"), "files": {"q8_0": {"file": "m.gguf"}}}))
    found = export_files(str(empty))
    assert found.run is None and found.ggufs == [("q8_0", empty / "m.gguf")] and "is gone" in found.notes[0]
    # So does a run whose base model is gone (it cannot be loaded): the run's own line says why.
    import shutil

    import yaml

    orphan = shutil.copytree(trained["run"], tmp_path / "orphan")
    doc = yaml.safe_load((orphan / "config.yaml").read_text())
    doc["resolved"]["model_path"] = str(tmp_path / "deleted-base")
    (orphan / "config.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    (empty / "export.json").write_text(json.dumps({"run": str(orphan), "files": {"q8_0": {"file": "m.gguf"}}}))
    found = export_files(str(empty))
    assert found.run is None and found.notes == [f"{orphan}: its base model {tmp_path / 'deleted-base'} is gone; restore "
                                                 "it or retrain: the reference is the largest GGUF, m.gguf"]


def test_help_states_the_tolerances_the_code_uses() -> None:
    from click.testing import CliRunner

    from qlocal.cli import cli
    from qlocal.quant_eval import DEFAULT_LIMIT, LOSS_TOLERANCE, STOPS_TOLERANCE

    out = " ".join(CliRunner().invoke(cli, ["eval", "--help"], terminal_width=1000).output.split())
    assert f"within {LOSS_TOLERANCE} nats/token of the run's and whose stops rate is >= the run's - {STOPS_TOLERANCE}" in out
    assert f"[default: 100; {DEFAULT_LIMIT} with --compare-quants]" in out


@pytest.mark.slow
def test_adapter_only_export_is_evaluated_with_its_adapter(trained, tiny_model_dir, tmp_path: Path) -> None:
    """Each base-<quant>.gguf of an --adapter-only export is scored with adapter.gguf applied: the
    trained model's loss, not the base's."""
    from qlocal.export.pipeline import ExportOptions, export_run
    from qlocal.quant_eval import export_files

    out = tmp_path / "adapter-export"
    export_run(trained["run"], ExportOptions(quants=["f16"], out_dir=out, verify=False, adapter_only=True),
               echo=lambda *_: None)
    found = export_files(str(out))
    assert [p.name for _, p in found.ggufs] == ["base-f16.gguf"] and found.adapter_bytes > 0
    budget = max(trained["lengths"]) + 1
    run = _eval(trained["run"], trained["data"], budget)["metrics"]
    gguf = _eval(out / "base-f16.gguf", trained["data"], budget)["metrics"]
    assert gguf["loss"] == pytest.approx(run["loss"], abs=1e-2) and gguf["stops"] == run["stops"] == 1.0
    base = _eval(tiny_model_dir("qwen2"), trained["data"], budget)["metrics"]
    assert abs(base["loss"] - run["loss"]) > 0.5  # without the adapter it would be the base's
