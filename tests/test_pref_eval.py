"""`qlocal eval` on preference data (qlocal.pref_eval): against TRL's DPOTrainer evaluation on the
same model and token ids, against the run's own validation loss, torch against MLX, --compare-base,
the report and table, and bad pair files."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from qlocal.errors import UserError

REPO = Path(__file__).resolve().parent.parent
PAIRS = REPO / "data/prefs_sample.jsonl"
KTO = REPO / "data/kto_sample.jsonl"
LOSS_TOL = 1e-5

pytest.importorskip("torch")
pytest.importorskip("peft")


def _head(src: Path, n: int, out: Path) -> Path:
    out.write_text("".join(src.read_text(encoding="utf-8").splitlines(keepends=True)[:n]), encoding="utf-8")
    return out


def _set_method(run: Path, method: str, **preference: Any) -> Path:
    """The run folder's config.yaml says it trained `method` with these preference hyperparameters."""
    doc = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    doc["train"]["method"] = method
    doc.setdefault("preference", {}).update(preference)
    (run / "config.yaml").write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return run


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pref_eval")


@pytest.fixture(scope="module")
def base(root: Path) -> Path:
    from infer_helpers import lively_model

    return lively_model(root, "qwen2")


@pytest.fixture(scope="module")
def sft_run(root: Path, base: Path) -> Path:
    from infer_helpers import synthetic_run

    return synthetic_run(root, base)


def _run(root: Path, base: Path, name: str, method: str, **preference: Any) -> Path:
    from export_helpers import make_run

    return _set_method(make_run(base, root / name, seed=3), method, **preference)


def test_dpo_eval_matches_trl_dpotrainer_evaluate(root: Path, base: Path) -> None:
    """TRL's DPOTrainer evaluation loop (Trainer.evaluate: its collator, compute_loss with the
    adapter disabled for the reference, its metric averaging) on the token ids qlocal renders."""
    pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    import torch
    import transformers
    from peft import PeftModel

    import trl
    from qlocal import rundir
    from qlocal.data.pref_formats import load_preference
    from qlocal.data.preference import render_preference
    from qlocal.evaluate import EvalOptions, evaluate

    beta = 0.3
    run = _run(root, base, "dpo-trl", "dpo", beta=beta)
    data = _head(PAIRS, 6, root / "pairs6.jsonl")  # 3 batches of 2: TRL's mean of batch means = the mean
    ours = evaluate(str(run), EvalOptions(data=str(data), batch_size=2), quiet=True)

    cfg = rundir.load_config(run)[0]
    tok = transformers.AutoTokenizer.from_pretrained(str(base))
    samples, _ = load_preference(str(data), "dpo", cfg.data)
    examples, _ = render_preference(samples, tok, (run / "chat_template.jinja").read_text(), cfg.data.max_seq_len)
    # TRL scores every completion token; qlocal's mask covers these answers whole, so the sums agree.
    assert len(examples) == 6 and all(all(e.chosen_mask) and all(e.rejected_mask) for e in examples)
    rows = [{"prompt_ids": e.prompt_ids, "chosen_ids": e.chosen_ids, "rejected_ids": e.rejected_ids} for e in examples]
    model = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32),
                                      str(run / "adapter"), is_trainable=True)
    dummy = datasets.Dataset.from_list([{"prompt": "hi", "chosen": " a", "rejected": " b"}] * 2)
    # fp32 as qlocal computes on CPU (DPOConfig's bf16 default would autocast the evaluation loop)
    args = trl.DPOConfig(output_dir=str(root / "trl-eval"), report_to=[], use_cpu=True, max_length=None, beta=beta,
                         per_device_eval_batch_size=2, bf16=False)
    tr = trl.DPOTrainer(model=model, args=args, train_dataset=dummy, processing_class=tok)
    if "ref" in tr.model.peft_config:  # TRL's copy of the loaded adapter: the reference is the base, as qlocal's
        tr.model.delete_adapter("ref")
    # Trainer.evaluate itself: DPOTrainer.evaluate would tokenise text again; these are token ids already.
    theirs = transformers.Trainer.evaluate(tr, eval_dataset=datasets.Dataset.from_list(rows))

    m = ours["metrics"]
    assert ours["method"] == "dpo" and ours["objective"]["beta"] == beta and ours["pairs"] == 6
    assert abs(m["loss"] - theirs["eval_loss"]) < LOSS_TOL, (m["loss"], theirs["eval_loss"])
    assert abs(m["loss"] - math.log(2)) > 1e-3  # the adapter moved the policy off its reference
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"):
        assert abs(m[key] - theirs[f"eval_{key}"]) < LOSS_TOL, (key, m[key], theirs[f"eval_{key}"])
    for key in ("logps/chosen", "logps/rejected"):  # sums of ~10-40 token log-probs in float32
        assert m[key] == pytest.approx(theirs[f"eval_{key}"], rel=1e-6), (key, m[key], theirs[f"eval_{key}"])
    assert 0.0 < m["rewards/accuracies"] < 1.0 or m["rewards/margins"] != 0.0


def _train(root: Path, base: Path, name: str, method: str, backend: str, val: Path, data: Path) -> Path:
    from qlocal import config as config_mod
    from qlocal.train import train

    sets = {"model.name": base, "data.path": data, "data.val_path": val, "run.output_dir": root, "run.name": name,
            "train.backend": backend, "train.iters": 2, "train.batch_size": 4, "train.eval_every": 2,
            "train.lr": 2e-3, "data.max_seq_len": 160, "lora.dropout": 0.0, "train.method": method,
            **({"train.dtype": "float32"} if backend == "torch" else {})}
    return train(config_mod.build(sets=[f"{k}={v}" for k, v in sets.items()]), quiet=True)


@pytest.mark.parametrize("method,backend", [("dpo", "torch"), pytest.param("kto", "torch", marks=pytest.mark.slow),
                                            pytest.param("orpo", "mlx", marks=pytest.mark.slow)])
def test_eval_loss_is_the_runs_validation_loss(method: str, backend: str, root: Path, base: Path) -> None:
    """The same held-out records give eval's loss and the run's last val_loss (same adapter)."""
    if backend == "mlx":
        pytest.importorskip("mlx_lm")
    from qlocal.evaluate import EvalOptions, evaluate

    src = KTO if method == "kto" else PAIRS
    val = _head(src, 10, root / f"val-{method}.jsonl")
    run = _train(root, base, f"{method}-{backend}", method, backend, val, src)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    report = evaluate(str(run), EvalOptions(data=str(val), backend=backend, batch_size=3), quiet=True)
    assert report["method"] == method and report["backend"] == backend
    assert report["metrics"]["loss"] == pytest.approx(rows[-1]["val_loss"], abs=2e-6)
    assert report[report["unit"]] == 10
    if method == "kto":
        assert "rewards/accuracies" not in report["metrics"] and report["metrics"]["kl"] >= 0.0
    else:
        m = report["metrics"]
        assert m["rewards/margins"] == pytest.approx(m["rewards/chosen"] - m["rewards/rejected"], abs=1e-9)
    if method == "orpo":
        m = report["metrics"]  # loss = NLL - lambda * log sigmoid(log odds ratio)
        assert m["loss"] == pytest.approx(m["nll_loss"] - 0.1 * m["log_odds_ratio"], abs=1e-9)
        assert report["reference"] is None


@pytest.mark.parametrize("method", ["dpo", "simpo", pytest.param("kto", marks=pytest.mark.slow)])
def test_mlx_figures_equal_torch(method: str, root: Path, base: Path) -> None:
    pytest.importorskip("mlx_lm")
    from qlocal.evaluate import EvalOptions, evaluate

    run = _run(root, base, f"{method}-xb", method, beta=0.5)
    data = _head(KTO if method == "kto" else PAIRS, 8, root / f"xb-{method}.jsonl")
    mlx, torch_ = (evaluate(str(run), EvalOptions(data=str(data), backend=b, compare_base=True), quiet=True)
                   for b in ("mlx", "torch"))
    assert mlx["backend"] == "mlx" and torch_["backend"] == "torch"
    for part in ("metrics", "base"):
        assert mlx[part].keys() == torch_[part].keys()
        for k, v in torch_[part].items():
            assert mlx[part][k] == pytest.approx(v, rel=1e-4, abs=1e-5), (part, k)


def test_sft_run_on_pairs_is_scored_with_dpo_beside_its_base(sft_run: Path, root: Path, qlocal_cli) -> None:
    from qlocal.evaluate import EvalOptions, default_report_path, evaluate

    data = _head(PAIRS, 8, root / "sft-pairs.jsonl")
    report = evaluate(str(sft_run), EvalOptions(data=str(data), compare_base=True), quiet=True)
    assert report["task"] == "preference" and report["method"] == "dpo" and report["objective"]["beta"] == 0.1
    base, m = report["base"], report["metrics"]
    # The base is its own reference: every pair scores ln 2 with no reward; the adapter's log-probs differ.
    assert base["loss"] == pytest.approx(math.log(2), abs=1e-12)
    assert base["rewards/chosen"] == base["rewards/rejected"] == base["rewards/accuracies"] == 0.0
    assert m["logps/chosen"] != base["logps/chosen"]
    assert report["delta"]["logps/chosen"] == pytest.approx(m["logps/chosen"] - base["logps/chosen"])
    # rewards are beta * (policy - reference) log-prob: the delta of the log-probs times beta
    assert m["rewards/chosen"] == pytest.approx(0.1 * report["delta"]["logps/chosen"], rel=1e-6)

    out = qlocal_cli("eval", sft_run, "--data", data, "--compare-base", "--quiet")
    assert out.returncode == 0, out.stderr
    path = default_report_path(str(sft_run), str(data))
    assert f"report    {path}" in out.stdout
    saved = json.loads(path.read_text(encoding="utf-8"))
    assert saved["metrics"]["loss"] == pytest.approx(m["loss"], abs=1e-6)
    table = out.stdout.splitlines()
    assert "8 pairs scored by dpo" in table[0] and "reference: the base model (adapter off)" in table[0]
    assert table[2].split() == ["metric", "base", "fine-tuned", "delta"]
    acc = next(x for x in table if x.startswith("rewards/accuracies")).split()
    assert float(acc[2]) == pytest.approx(m["rewards/accuracies"], abs=1e-4)


def test_plain_model_on_pairs_says_it_is_its_own_reference(base: Path, root: Path) -> None:
    from qlocal.evaluate import EvalOptions, evaluate

    data = _head(PAIRS, 4, root / "model-pairs.jsonl")
    report = evaluate(str(base), EvalOptions(data=str(data)), quiet=True)
    assert report["kind"] == "model" and report["metrics"]["rewards/margins"] == 0.0
    assert "its own reference" in report["note"]
    with pytest.raises(UserError, match="--compare-base needs a run folder"):
        evaluate(str(base), EvalOptions(data=str(data), compare_base=True), quiet=True)


def test_bad_pair_file_is_one_line_naming_file_and_line(sft_run: Path, root: Path, qlocal_cli) -> None:
    from qlocal.evaluate import EvalOptions, evaluate

    good = PAIRS.read_text(encoding="utf-8").splitlines()
    bad = root / "bad-pairs.jsonl"
    rec = json.loads(good[1])
    del rec["rejected"]
    bad.write_text("\n".join([good[0], json.dumps(rec), good[2]]) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"bad-pairs\.jsonl:2: missing 'rejected'"):
        evaluate(str(sft_run), EvalOptions(data=str(bad)), quiet=True)
    out = qlocal_cli("eval", sft_run, "--data", bad, "--quiet")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert [x for x in out.stderr.splitlines() if x.strip()] == [next(x for x in out.stderr.splitlines()
                                                                      if "bad-pairs.jsonl:2:" in x)]
    # The line's advice names --skip-bad-lines: eval takes it, skips the record and says so.
    tmp_report = root / "skipped-report.json"
    out = qlocal_cli("eval", sft_run, "--data", bad, "--skip-bad-lines", "--report", tmp_report, "--quiet")
    assert out.returncode == 0, out.stderr
    report = json.loads(tmp_report.read_text(encoding="utf-8"))
    assert report["skipped"] == 1 and report["pairs"] == 2
    assert "(pairs, 1 malformed skipped)" in out.stdout
    same = root / "same-pairs.jsonl"
    rec = json.loads(good[0])
    rec["rejected"] = rec["chosen"]
    same.write_text(json.dumps(rec) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"same-pairs\.jsonl:1: 'chosen' and 'rejected' are identical"):
        evaluate(str(sft_run), EvalOptions(data=str(same)), quiet=True)
    assert not list(root.glob("run-*/eval-bad-pairs.json")) and not list(root.glob("run-*/eval-same-pairs.json"))
