"""`qlocal eval`: text metrics by hand, loss/perplexity as training counts them, --compare-base,
the JSON report, labels through a data mapping, GGUF and MLX scoring."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from qlocal.errors import UserError
from qlocal.metrics_text import (classification, corpus_bleu, exact_match, is_mostly_cjk, label_set,
                                 normalize, predicted_label, rouge_l, text_metrics, tokenize)

REPO = Path(__file__).resolve().parent.parent
eval_needed = pytest.mark.skipif(any(__import__("importlib").util.find_spec(m) is None for m in
                                     ("sacrebleu", "rouge_score", "sklearn")), reason="needs the eval extra")


# ---- metrics, by hand ------------------------------------------------------------------------


def test_tokenize_cjk_characters_and_words() -> None:
    assert tokenize("今天天气很好。") == ["今", "天", "天", "气", "很", "好", "。"]
    assert tokenize("GPU很快, ok?") == ["GPU", "很", "快", ",", "ok", "?"]
    assert tokenize("すもももももも") == list("すもももももも")  # Japanese kana, one token each
    assert tokenize("The cat sat.") == ["The", "cat", "sat", "."]
    assert is_mostly_cjk("今天天气很好 ok") and not is_mostly_cjk("a GPU 很")


@eval_needed
def test_rouge_l_by_hand() -> None:
    # LCS "the cat on the mat" = 5 of 6 tokens each way.
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    # Chinese by characters: LCS 5, P = 5/5, R = 5/6.
    assert rouge_l("今天天气好", "今天天气很好") == pytest.approx(2 * 1 * (5 / 6) / (1 + 5 / 6))
    # rouge-score gives 0 when either side has no tokens, two empty texts included (was 1.0 by hand).
    assert rouge_l("The Cat!", "the cat") == 1.0 and rouge_l("", "x") == 0.0 and rouge_l("", "") == 0.0


@eval_needed
def test_bleu_by_hand() -> None:
    assert corpus_bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    # p1..p4 = 4/5, 3/4, 2/3, 1/2; brevity exp(1 - 6/5).
    expected = 100 * math.exp(1 - 6 / 5) * (4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25
    assert corpus_bleu(["a b c d e"], ["a b c d f g"]) == pytest.approx(expected)
    # No 3- or 4-gram match: "exp" smoothing gives 1/(2*2) and 1/(4*1).
    assert corpus_bleu(["a b x d"], ["a b c d"]) == pytest.approx(100 * (3 / 4 * 1 / 3 * 1 / 4 * 1 / 4) ** 0.25)
    # Corpus level: n-gram counts are summed over pairs, not scores averaged.
    assert corpus_bleu(["a b c d", "x y"], ["a b c d", "p q"]) == pytest.approx(100 * (4 / 6 * 3 / 4) ** 0.25)


@eval_needed
def test_bleu_chinese_is_character_level() -> None:
    # Characters: p1 5/5 (今天天气好 all occur), p2 3/4 (今天 天天 天气, not 气好), p3 2/3, p4 1/2;
    # brevity exp(1 - 6/5). Split on spaces, each side would be one differing token: BLEU 0.
    expected = 100 * math.exp(1 - 6 / 5) * (1 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25
    assert corpus_bleu(["今天天气好"], ["今天天气很好"]) == pytest.approx(expected)
    assert corpus_bleu(["今天天气很好"], ["今天天气很好"]) == pytest.approx(100.0)
    # Two-character answers: orders 3 and 4 have no n-grams at all and are left out.
    assert corpus_bleu(["正面", "负面"], ["正面", "负面"]) == pytest.approx(100.0)


def test_exact_match_normalises() -> None:
    assert normalize("  The  Answer, is PARIS. ") == "the answer is paris"
    assert exact_match("The answer is Paris.", "the answer is paris") == 1.0
    assert exact_match("正面。", "正面") == 1.0 and exact_match("正面", "负面") == 0.0


def test_label_rule() -> None:
    assert label_set(["正面", "负面", "正面", "负面"]) == ["正面", "负面"]
    assert label_set(["Yes.", "no", "yes", "No"]) == ["no", "yes"]
    assert label_set(["yes"] * 4) is None                          # one value is not a classification
    assert label_set(["a", "b", "c", "d"]) is None                 # no value repeats
    assert label_set(["a", "b", "a"]) is None                      # too few references
    assert label_set(["one two three four five", "x"] * 3) is None  # answers, not labels
    assert label_set(["whatever"], known=["Positive", "negative"]) == ["negative", "positive"]  # label_map


@eval_needed
def test_predicted_label_and_classification_by_hand() -> None:
    labels = ["正面", "负面"]
    assert predicted_label("正面", labels) == "正面"
    assert predicted_label("这是正面的评价。", labels) == "正面"
    assert predicted_label("负面，不是正面", labels) == "负面"  # the first one named
    assert predicted_label("不知道", labels) is None
    assert predicted_label("Positive!", ["negative", "positive"]) == "positive"
    out = classification(["正面", "负面", "正面", "其他"], ["正面", "负面", "负面", "负面"], labels)
    # 正面: tp 1, fp 1, fn 0 -> 2/3; 负面: tp 1, fp 0, fn 2 -> 1/2.
    assert out["accuracy"] == pytest.approx(0.5)
    assert out["macro_f1"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert set(text_metrics(["a"], ["a"], None)) == {"rouge_l", "bleu", "chrf", "exact_match"}


# ---- models ----------------------------------------------------------------------------------

torch_needed = pytest.mark.skipif(__import__("importlib").util.find_spec("peft") is None, reason="needs the torch extra")

TEST_RECORDS = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
                  {"role": "assistant", "content": "Paris."}]},
    {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                  {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "6"}]},
    {"messages": [{"role": "user", "content": "Colour of the sky?"}, {"role": "assistant", "content": "Blue, on a clear day."}]},
]


@pytest.fixture(scope="module")
def test_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("evaldata") / "test.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in TEST_RECORDS), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    pytest.importorskip("peft")
    from infer_helpers import lively_model, synthetic_run

    root = tmp_path_factory.getbasetemp()
    return synthetic_run(root, lively_model(root, "qwen2"))


def _hand_loss(model_dir: str, adapter: Path | None, template: str, path: Path) -> tuple[float, int]:
    """Summed CE over assistant tokens with plain transformers/PEFT forward passes."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlocal.data.formats import load_samples
    from qlocal.data.render import render

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        import peft

        model = peft.PeftModel.from_pretrained(model, str(adapter))
    total, n = 0.0, 0
    for s in load_samples(str(path))[0]:
        ex = render(s, tok, template)
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ex.input_ids])).logits[0].double(), -1)
        for t in range(len(ex.input_ids) - 1):
            if ex.loss_mask[t + 1]:
                total -= float(logp[t, ex.input_ids[t + 1]])
                n += 1
    return total, n


def _base_path(run: Path) -> str:
    import yaml

    return yaml.safe_load((run / "config.yaml").read_text())["resolved"]["model_path"]


@torch_needed
def test_loss_and_perplexity_by_hand(run: Path, test_file: Path, tmp_path: Path) -> None:
    from qlocal.evaluate import EvalOptions, evaluate

    report = evaluate(str(run), EvalOptions(data=str(test_file), generate=False, report=tmp_path / "r.json"), quiet=True)
    total, n = _hand_loss(_base_path(run), run / "adapter", (run / "chat_template.jinja").read_text(), test_file)
    m = report["metrics"]
    assert m["trained_tokens"] == n and report["loss_examples"] == 3
    assert m["loss"] == pytest.approx(total / n, rel=1e-5)
    assert m["perplexity"] == pytest.approx(math.exp(m["loss"]), rel=1e-9)
    assert json.loads((tmp_path / "r.json").read_text())["metrics"]["loss"] == m["loss"]


@torch_needed
def test_eval_loss_equals_training_validation_loss(tiny_model_dir, tmp_path: Path) -> None:
    """The loss eval reports for a run is the validation loss training logged for the same file."""
    from qlocal import config as config_mod
    from qlocal.evaluate import EvalOptions, evaluate
    from qlocal.train import train

    val = str(REPO / "data/messages_sample.jsonl")
    cfg = config_mod.build(sets=[f"model.name={tiny_model_dir('llama')}", f"data.path={REPO / 'data/alpaca_sample.jsonl'}",
                                 f"data.val_path={val}", f"run.output_dir={tmp_path}", "run.name=r", "train.backend=torch",
                                 "train.iters=2", "train.batch_size=4", "train.lr=1e-2", "data.max_seq_len=64"])
    run = train(cfg, quiet=True)
    val_loss = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()][-1]["val_loss"]
    report = evaluate(str(run), EvalOptions(data=val, generate=False), quiet=True)
    assert report["truncated"] > 0  # max_seq_len from the run applies, as in training
    assert report["metrics"]["loss"] == pytest.approx(val_loss, abs=2e-6)


@torch_needed
@eval_needed
def test_compare_base_columns_and_report(run: Path, test_file: Path, tmp_path: Path, qlocal_cli) -> None:
    res = qlocal_cli("eval", run, "--data", test_file, "--compare-base", "--limit", "2", "--max-tokens", "4",
                     "--report", tmp_path / "report.json", "--quiet")
    assert res.returncode == 0, res.stderr
    header = next(ln for ln in res.stdout.splitlines() if ln.startswith("metric"))
    assert header.split() == ["metric", "base", "fine-tuned", "delta"]
    rows = {ln.split()[0]: ln.split()[1:] for ln in res.stdout.splitlines() if ln.split() and ln.split()[0] in
            ("loss", "perplexity", "rouge_l", "bleu", "exact_match")}
    assert set(rows) == {"loss", "perplexity", "rouge_l", "bleu", "exact_match"} and all(len(v) == 3 for v in rows.values())
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["kind"] == "run" and report["generation"]["records"] == 2 and report["generation"]["labels"] is None
    for key in ("loss", "perplexity", "rouge_l", "bleu", "exact_match"):
        assert report["delta"][key] == pytest.approx(report["metrics"][key] - report["base"][key])
    assert report["base"]["loss"] != report["metrics"]["loss"]  # the adapter was switched off for the base column
    # The base column is the base model itself: same loss as evaluating the base folder directly.
    base_total, n = _hand_loss(_base_path(run), None, (run / "chat_template.jinja").read_text(), test_file)
    assert report["base"]["loss"] == pytest.approx(base_total / n, rel=1e-5)
    assert [s["where"] for s in report["samples"]] == [f"{test_file}:1", f"{test_file}:2"]
    assert all(isinstance(s["prediction"], str) and "base_prediction" in s for s in report["samples"])
    assert report["samples"][0]["reference"] == "Paris."


@torch_needed
def test_default_report_in_run_folder_and_errors(run: Path, test_file: Path, tiny_model_dir, qlocal_cli,
                                                  tmp_path: Path) -> None:
    from qlocal.evaluate import EvalOptions, run_eval

    lines: list[str] = []
    run_eval(str(run), EvalOptions(data=str(test_file), generate=False), echo=lines.append, quiet=True)
    assert (run / "eval-test.json").is_file() and lines[-1] == f"report    {run / 'eval-test.json'}"
    res = qlocal_cli("eval", tiny_model_dir("qwen2"), "--data", test_file, "--compare-base", "--no-generate")
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0 and "base model already" in res.stderr
    with pytest.raises(UserError, match="drop --config"):
        run_eval(str(run), EvalOptions(data=str(test_file), config_file=str(REPO / "configs/quickstart.yaml")))
    broken = tmp_path / "broken.jsonl"
    broken.write_text(test_file.read_text(encoding="utf-8") + '{"messages": [\n', encoding="utf-8")
    res = qlocal_cli("eval", run, "--data", broken, "--no-generate", "--report", tmp_path / "b.json")
    assert res.returncode == 2 and "broken.jsonl:4: not valid JSON" in res.stderr and "--skip-bad-lines" in res.stderr
    assert not (tmp_path / "b.json").exists()
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    res = qlocal_cli("eval", run, "--data", test_file, "--report", a_file / "r.json")  # fails before loading
    assert res.returncode == 2 and res.stderr.strip() == (f"error: --report {a_file}/r.json: {a_file} is not a "
                                                          "folder; give a report path in a folder you can write")
    # ... and eval takes the option its error names: the line is skipped and counted.
    res = qlocal_cli("eval", run, "--data", broken, "--no-generate", "--report", tmp_path / "b.json", "--skip-bad-lines")
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "b.json").read_text())["skipped"] == 1 and "1 malformed skipped" in res.stdout


@torch_needed
@eval_needed
def test_labels_through_the_sentiment_mapping(tiny_model_dir, tmp_path: Path) -> None:
    from qlocal.evaluate import EvalOptions, evaluate

    report = evaluate(str(tiny_model_dir("qwen2")), EvalOptions(
        data=str(REPO / "data/sentiment_zh_sample.jsonl"), config_file=str(REPO / "configs/mapping_sentiment.yaml"),
        limit=4, max_tokens=3, report=tmp_path / "r.json"), quiet=True)
    gen = report["generation"]
    assert report["kind"] == "model" and report["format"] == "mapped" and report["records"] == 20
    assert gen["labels"] == ["正面", "负面"] and gen["tokens"] == "characters (CJK)" and gen["records"] == 4
    assert 0.0 <= report["metrics"]["accuracy"] <= 1.0 and 0.0 <= report["metrics"]["macro_f1"] <= 1.0
    assert [s["reference"] for s in report["samples"]] == ["正面", "负面", "正面", "负面"]
    assert "tok:zh" in gen["computed_by"]["bleu"]  # sacrebleu's Chinese tokenizer, said in its signature


LABEL_RECORDS = [{"messages": [{"role": "user", "content": f"Is {n} even?"}, {"role": "assistant", "content": a}]}
                 for n, a in ((2, "yes"), (3, "no"), (4, "yes"), (5, "no"))]


@torch_needed
@eval_needed
def test_report_and_table_on_a_tiny_run_have_every_metric(run: Path, tmp_path: Path, qlocal_cli) -> None:
    """Label answers on a run with --compare-base: the report has every text and label metric, the
    per-class numbers and confusion matrix of both columns, and how each was computed; the table
    prints them."""
    data = tmp_path / "labels.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in LABEL_RECORDS), encoding="utf-8")
    res = qlocal_cli("eval", run, "--data", data, "--compare-base", "--max-tokens", "3",
                     "--report", tmp_path / "r.json", "--quiet")
    assert res.returncode == 0, res.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    gen = report["generation"]
    assert gen["labels"] == ["no", "yes"] and gen["tokens"] == "words"
    assert gen["computed_by"]["bleu"].startswith("sacrebleu nrefs:1|case:mixed|eff:yes|tok:13a|smooth:exp|version:")
    assert gen["computed_by"]["chrf"].startswith("sacrebleu nrefs:1|") and "rouge-score" in gen["computed_by"]["rouge_l"]
    scalars = {"loss", "perplexity", "stops", "answer_tokens", "rouge_l", "bleu", "chrf", "exact_match", "accuracy",
               "macro_precision", "macro_recall", "macro_f1"}
    for col in ("base", "metrics"):
        m = report[col]
        assert scalars | {"per_class", "confusion_matrix", "trained_tokens"} == set(m)
        cm = m["confusion_matrix"]
        assert cm["predicted"] == cm["labels"] + ["(none)"] and set(cm["labels"]) <= {"no", "yes"}
        assert [sum(row) for row in cm["matrix"]] == [m["per_class"][c]["support"] for c in cm["labels"]]
        assert sum(map(sum, cm["matrix"])) == 4 and set(m["per_class"]) == set(cm["labels"])
    assert set(report["delta"]) == scalars  # scalars only: matrices are not subtracted
    out = res.stdout
    for needle in ("macro_precision", "macro_recall", "chrf", "stops", "answer_tokens", "base: per class", "fine-tuned: per class",
                   "base: confusion matrix", "fine-tuned: confusion matrix", "BLEU: sacrebleu nrefs:1",
                   "chrF: sacrebleu nrefs:1"):
        assert needle in out, needle


@torch_needed
def test_missing_eval_library_is_one_line_naming_the_extra(tiny_model_dir, test_file: Path, tmp_path: Path,
                                                            qlocal_cli) -> None:
    shadow = tmp_path / "shadow" / "sacrebleu"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    res = qlocal_cli("eval", tiny_model_dir("qwen2"), "--data", test_file, "--max-tokens", "2", "--quiet",
                     "--report", tmp_path / "r.json", env={"PYTHONPATH": str(shadow.parent)})
    # The last line (bitsandbytes may print a line of its own when peft imports it), and no traceback.
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.strip().splitlines()[-1] == "error: sacrebleu is not installed: pip install 'qlocal[eval]'"
    assert not (tmp_path / "r.json").exists()


# ---- GGUF and MLX ------------------------------------------------------------------------------


@torch_needed
@eval_needed
def test_gguf_loss_matches_torch(run: Path, test_file: Path, tmp_path_factory, tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp")
    from infer_helpers import export_folder

    from qlocal.evaluate import EvalOptions, evaluate

    exp = export_folder(tmp_path_factory.getbasetemp(), run)
    report = evaluate(str(exp), EvalOptions(data=str(test_file), limit=1, max_tokens=3), quiet=True)
    total, n = _hand_loss(_base_path(run), run / "adapter", (run / "chat_template.jinja").read_text(), test_file)
    assert report["kind"] == "gguf" and report["backend"] == "llama.cpp"
    assert report["metrics"]["trained_tokens"] == n
    assert report["metrics"]["loss"] == pytest.approx(total / n, rel=2e-3)  # F16 weights
    assert report["generation"]["records"] == 1 and "rouge_l" in report["metrics"]
    with pytest.raises(UserError, match="--compare-base needs a run folder"):
        evaluate(str(exp), EvalOptions(data=str(test_file), compare_base=True, generate=False), quiet=True)
    with pytest.raises(UserError, match=f"eval the run folder instead of its GGUF: .*{run.name}$"):  # names the run
        evaluate(str(exp), EvalOptions(data=str(REPO / "data/prefs_sample.jsonl")), quiet=True)
    # A lone GGUF (no fused/ tokenizer beside it): generation metrics only, and a note saying why.
    lone = tmp_path / "m.gguf"
    lone.symlink_to(exp / "model-f16.gguf")
    report = evaluate(str(lone), EvalOptions(data=str(test_file), limit=1, max_tokens=3), quiet=True)
    assert "loss" not in report["metrics"] and "fused/" in report["loss_note"] and "bleu" in report["metrics"]


@torch_needed
@eval_needed
def test_mlx_loss_equals_torch(run: Path, test_file: Path, tmp_path_factory) -> None:
    pytest.importorskip("mlx.core")
    pytest.importorskip("mlx_lm")
    from infer_helpers import lively_model, synthetic_run

    from qlocal.evaluate import EvalOptions, evaluate

    root = tmp_path_factory.getbasetemp()
    mlx_run = synthetic_run(root, lively_model(root, "qwen2"), backend="mlx")
    mlx = evaluate(str(mlx_run), EvalOptions(data=str(test_file), backend="mlx", compare_base=True, limit=1,
                                             max_tokens=3), quiet=True)
    torch_ = evaluate(str(mlx_run), EvalOptions(data=str(test_file), backend="torch", compare_base=True, limit=1,
                                                max_tokens=3), quiet=True)
    assert mlx["backend"] == "mlx" and torch_["backend"] == "torch"
    assert mlx["metrics"]["loss"] == pytest.approx(torch_["metrics"]["loss"], rel=1e-4)
    assert mlx["base"]["loss"] == pytest.approx(torch_["base"]["loss"], rel=1e-4)


@torch_needed
def test_eval_on_preference_pairs_says_what_eval_reads(run: Path, tmp_path: Path) -> None:
    # A file of pairs is scored as pairs (tests/test_pref_eval.py); a pair among one-answer records
    # gets eval's own wording, not training's "train it with --method dpo" (a circle after a DPO run).
    from qlocal.data.formats import load_samples
    from qlocal.evaluate import EvalOptions, evaluate

    pairs = REPO / "data/prefs_sample.jsonl"
    assert evaluate(str(run), EvalOptions(data=str(pairs), generate=False), quiet=True)["task"] == "preference"
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps(TEST_RECORDS[0]) + "\n" + pairs.read_text(encoding="utf-8").splitlines()[0] + "\n",
                     encoding="utf-8")
    with pytest.raises(UserError, match=r"mixed.jsonl:2: a preference pair .*qlocal eval scores a file of pairs") as err:
        evaluate(str(run), EvalOptions(data=str(mixed), generate=False), quiet=True)
    assert "--method" not in str(err.value)
    with pytest.raises(UserError, match="train it with --method dpo"):
        load_samples(str(pairs))


_BNB_LINE = "gemm_4bit_forward"


@torch_needed
@eval_needed
def test_eval_and_generate_print_no_bitsandbytes_kernels_warning(run: Path, test_file: Path, qlocal_cli) -> None:
    """peft imports bitsandbytes, which on AVX512-BF16 CPUs warns "Failed to load CPU gemm_4bit_forward
    ... pip install kernels" at import: eval and generate (without --quiet) must not show it."""
    import subprocess
    import sys

    if __import__("importlib").util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes is not installed: there is no warning to hide")
    bare = subprocess.run([sys.executable, "-c", "import bitsandbytes"], capture_output=True, text=True)
    if _BNB_LINE not in bare.stderr:
        pytest.skip("bitsandbytes does not warn on this CPU (no AVX512-BF16, or `kernels` installed)")
    res = qlocal_cli("eval", run, "--data", test_file, "--max-tokens", "2", "--limit", "1")
    assert res.returncode == 0, res.stderr
    assert _BNB_LINE not in res.stderr and "pip install kernels" not in res.stderr
    res = qlocal_cli("generate", run, "--prompt", "Hi", "--max-tokens", "2")
    assert res.returncode == 0, res.stderr
    assert _BNB_LINE not in res.stderr and "pip install kernels" not in res.stderr
