"""`qlocal eval`'s metrics from the field's libraries (sacrebleu, rouge-score, scikit-learn), checked
against numbers computed by hand: label metrics per class, macro averages and the confusion matrix;
Chinese BLEU / ROUGE-L / chrF on characters; Japanese BLEU on MeCab words; the table's rendering."""

from __future__ import annotations

import importlib.util
import math
import sys

import pytest

from qlocal import metrics_text as mt
from qlocal.errors import UserError
from qlocal.metrics_text import (RougeTokenizer, bleu_tokenizer, classification, corpus_bleu, corpus_chrf, rouge_l,
                                 sources, text_metrics)

pytestmark = pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("sacrebleu", "rouge_score", "sklearn")),
                                reason="needs the eval extra")

# Six answers, three classes; "fox" is never predicted, one answer names no label, and "bird" (a
# label_map label that occurs nowhere) is left out of the classes.
PREDICTIONS = ["cat", "It is a dog.", "I don't know", "Dog", "cat!", "dog"]
REFERENCES = ["cat", "cat", "cat", "dog", "dog", "fox"]
LABELS = ["bird", "cat", "dog", "fox"]


def test_per_class_macro_and_confusion_matrix_by_hand() -> None:
    out = classification(PREDICTIONS, REFERENCES, LABELS)
    # Pairs (reference, predicted): cat/cat, cat/dog, cat/-, dog/dog, dog/cat, fox/dog.
    # cat: tp 1, fp 1, fn 2 -> P 1/2, R 1/3, F1 2/5. dog: tp 1, fp 2, fn 1 -> P 1/3, R 1/2, F1 2/5.
    # fox: tp 0, nothing predicted -> P 0 (zero_division=0), R 0, F1 0.
    expected = {"cat": (1 / 2, 1 / 3, 2 / 5, 3), "dog": (1 / 3, 1 / 2, 2 / 5, 2), "fox": (0.0, 0.0, 0.0, 1)}
    assert list(out["per_class"]) == ["cat", "dog", "fox"]
    for label, (p, r, f, n) in expected.items():
        got = out["per_class"][label]
        assert (got["precision"], got["recall"], got["f1"]) == pytest.approx((p, r, f)) and got["support"] == n
    assert out["accuracy"] == pytest.approx(2 / 6)
    assert out["macro_precision"] == pytest.approx((1 / 2 + 1 / 3 + 0) / 3)
    assert out["macro_recall"] == pytest.approx((1 / 3 + 1 / 2 + 0) / 3)
    assert out["macro_f1"] == pytest.approx((2 / 5 + 2 / 5 + 0) / 3)
    cm = out["confusion_matrix"]
    assert cm["rows"] == "reference" and cm["columns"] == "predicted"
    assert cm["labels"] == ["cat", "dog", "fox"] and cm["predicted"] == ["cat", "dog", "fox", "(none)"]
    assert cm["matrix"] == [[1, 1, 0, 1],
                            [1, 1, 0, 0],
                            [0, 1, 0, 0]]


def test_chinese_bleu_rouge_and_chrf_on_characters() -> None:
    pred, ref = "我喜欢猫。", "我很喜欢猫。"
    assert bleu_tokenizer([ref]) == "zh"
    # sacrebleu `zh`: every character a token, "。" included: 5 vs 6 tokens.
    # p1 5/5; p2 3/4 (我喜 is not in the reference); p3 2/3; p4 1/2; brevity exp(1 - 6/5).
    bleu = 100 * math.exp(1 - 6 / 5) * (1 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25
    assert corpus_bleu([pred], [ref]) == pytest.approx(bleu)
    assert corpus_bleu([pred], [ref], tokenizer="13a") == 0.0  # one "word" each side: why `zh` is needed
    # ROUGE-L drops punctuation: 4 vs 5 characters, LCS 4 -> P 1, R 4/5.
    assert rouge_l(pred, ref) == pytest.approx(2 * 1 * 0.8 / 1.8)
    from rouge_score import rouge_scorer

    assert rouge_scorer.RougeScorer(["rougeL"]).score(ref, pred)["rougeL"].fmeasure == 0.0  # default drops CJK
    # chrF (sacrebleu, effective order): character n-grams, whitespace ignored.
    # "今天天气好" vs "今天天气很好": n = 1..5 (hyp, ref, match): (5,6,5) (4,5,3) (3,4,2) (2,3,1) (1,2,0).
    p = (5 / 5 + 3 / 4 + 2 / 3 + 1 / 2 + 0) / 5
    r = (5 / 6 + 3 / 5 + 2 / 4 + 1 / 3 + 0) / 5
    assert corpus_chrf(["今天天气好"], ["今天天气很好"]) == pytest.approx(100 * 5 * p * r / (4 * p + r))
    assert corpus_chrf(["ab"], ["abc"]) == pytest.approx(100 * 7 / 11)  # P 1, R (2/3 + 1/2) / 2, beta 2


def test_japanese_bleu_on_mecab_words() -> None:
    pytest.importorskip("MeCab")
    pytest.importorskip("ipadic")
    assert bleu_tokenizer(["今日はいい天気です"]) == "ja-mecab"
    # MeCab/IPA: 今日 は 天気 です (4) vs 今日 は いい 天気 です (5). p1 4/4; p2 2/3 (今日は, 天気です);
    # p3, p4 no match: "exp" smoothing 1/(2*2), 1/(4*1); brevity exp(1 - 5/4).
    expected = 100 * math.exp(1 - 5 / 4) * (1 * 2 / 3 * 1 / 4 * 1 / 4) ** 0.25
    assert corpus_bleu(["今日は天気です"], ["今日はいい天気です"]) == pytest.approx(expected)
    assert "tok:ja-mecab-" in sources(["今日はいい天気です"], None)["bleu"]


def test_rouge_tokenizer_is_rouge_scores_own_on_ascii() -> None:
    from rouge_score import tokenize

    for text in ("The cat sat on the mat.", "2+2=4, don't e-mail me_now!", "  GPU x86_64 A100 "):
        assert RougeTokenizer().tokenize(text) == tokenize.tokenize(text, None)
    assert RougeTokenizer().tokenize("GPU很快, été") == ["gpu", "很", "快", "été"]


def test_signatures_name_the_tokenizer() -> None:
    how = sources(["the cat", "a dog"], ["cat", "dog"])
    assert how["bleu"].startswith("sacrebleu nrefs:1|case:mixed|eff:yes|tok:13a|smooth:exp|version:")
    assert how["chrf"].startswith("sacrebleu nrefs:1|case:mixed|eff:yes|nc:6|nw:0|space:no|version:")
    assert how["rouge_l"].startswith("rouge-score ") and how["labels"].startswith("scikit-learn ")
    assert "labels" not in sources(["the cat"], None)


def test_missing_library_is_one_line_naming_the_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "sacrebleu", None)  # import raises ImportError
    mt._bleu.cache_clear()
    try:
        with pytest.raises(UserError, match=r"^sacrebleu is not installed: pip install 'qlocal\[eval\]'$"):
            corpus_bleu(["a"], ["a"])
    finally:
        mt._bleu.cache_clear()


def test_table_renders_per_class_and_confusion_matrix() -> None:
    from qlocal.evaluate import table

    m = text_metrics(PREDICTIONS, REFERENCES, LABELS)
    report = {"kind": "model", "data": "t.jsonl", "records": 6, "format": "messages", "loss_examples": 0,
              "metrics": m, "generation": {"records": 6, "max_tokens": 8, "tokens": "words", "labels": LABELS,
                                           "computed_by": sources(REFERENCES, LABELS)}}
    lines = table(report).splitlines()
    rows = {ln.split()[0]: ln.split()[1:] for ln in lines if ln.split()}
    assert rows["macro_precision"] == [f"{m['macro_precision']:.4f}"] and rows["chrf"] == [f"{m['chrf']:.2f}"]
    start = lines.index("model: confusion matrix (rows: reference, columns: predicted)")
    assert lines[start + 1].split() == ["cat", "dog", "fox", "(none)"]
    assert [ln.split() for ln in lines[start + 2:start + 5]] == [["cat", "1", "1", "0", "1"], ["dog", "1", "1", "0", "0"],
                                                                 ["fox", "0", "1", "0", "0"]]
    per = lines.index("model: per class")
    assert lines[per + 2].split() == ["cat", "0.5000", "0.3333", "0.4000", "3"]
    assert any(ln.startswith("BLEU: sacrebleu nrefs:1|") for ln in lines)
