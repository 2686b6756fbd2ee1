"""Text and label metrics for `qlocal eval`, computed by the field's own libraries (extra `eval`).

- BLEU and chrF: sacrebleu, corpus level. BLEU's tokenizer follows the references: `zh` (every
  Chinese character a token) when they are mostly Chinese, `ja-mecab` (MeCab words, as WMT scores
  Japanese) when they are mostly CJK with kana in them, else `13a`. Its signature string says
  exactly how a number was computed.
- ROUGE-L: google's rouge-score (mean F1 per pair). Its default tokenizer keeps only [a-z0-9], so
  Chinese would score 0; ours gives the same tokens on ASCII text, keeps non-ASCII letters and
  makes every CJK ideograph or kana character a token of its own.
- Labels: scikit-learn's accuracy, per-class and macro precision/recall/F1, confusion matrix.
- Exact match stays ours: equality after NFKC, lower-casing and dropping punctuation.
"""

from __future__ import annotations

import importlib
import re
import unicodedata
from functools import lru_cache
from typing import Any, Iterable

from qlocal.errors import missing_extra

EXTRA = "eval"
# CJK unified ideographs (+ext A, compatibility), hiragana, katakana (+phonetic ext, half-width), ext B-F.
_CJK = re.compile("[\u3040-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff66-\uff9f"
                  "\U00020000-\U0002fa1f]")
_KANA = re.compile("[\u3040-\u309f\u30a0-\u30ff\u31f0-\u31ff\uff66-\uff9f]")
_TOKEN = re.compile(r"\w+|[^\w\s]")
_WORD = re.compile(r"[^\W_]+")  # letters and digits: on ASCII exactly rouge-score's [a-z0-9]+


def _lib(module: str, package: str) -> Any:
    """Import an optional library, or raise the one-line error naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise missing_extra(package, EXTRA) from None


def is_mostly_cjk(text: str) -> bool:
    """True when over half of the non-space characters are CJK ideographs or kana."""
    chars = [c for c in text if not c.isspace()]
    return bool(chars) and sum(1 for c in chars if _CJK.match(c)) * 2 > len(chars)


def tokenize(text: str) -> list[str]:
    """CJK/kana characters one by one, other words whole, punctuation marks separately."""
    return _TOKEN.findall(_CJK.sub(r" \g<0> ", unicodedata.normalize("NFKC", text)))


def normalize(text: str) -> str:
    """For exact match and labels: NFKC, lower case, punctuation dropped, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(" " if unicodedata.category(c).startswith("P") else c for c in text)
    return " ".join(text.split())


def bleu_tokenizer(references: Iterable[str]) -> str:
    """sacrebleu tokenizer for these references: `zh`, `ja-mecab` or `13a`."""
    text = "".join(references)
    if not is_mostly_cjk(text):
        return "13a"
    return "ja-mecab" if _KANA.search(text) else "zh"


# --------------------------------------------------------------------------------------------
# sacrebleu and rouge-score


@lru_cache(maxsize=None)
def _bleu(tokenizer: str) -> Any:
    if tokenizer == "ja-mecab":  # sacrebleu[ja]; sacrebleu itself only fails later, with a RuntimeError
        _lib("MeCab", "mecab-python3")
        _lib("ipadic", "ipadic")
    # Effective order: a corpus of one- or two-token answers (labels) still gets a BLEU score.
    return _lib("sacrebleu", "sacrebleu").BLEU(tokenize=tokenizer, effective_order=True)


@lru_cache(maxsize=None)
def _chrf() -> Any:
    return _lib("sacrebleu", "sacrebleu").CHRF()


def corpus_bleu(predictions: Iterable[str], references: Iterable[str], tokenizer: str | None = None) -> float:
    """sacrebleu corpus BLEU-4 (0-100), one reference per prediction, case-sensitive, "exp"
    smoothing, effective order; the tokenizer is chosen from the references unless given."""
    refs = list(references)
    return float(_bleu(tokenizer or bleu_tokenizer(refs)).corpus_score(list(predictions), [refs]).score)


def corpus_chrf(predictions: Iterable[str], references: Iterable[str]) -> float:
    """sacrebleu corpus chrF2 (0-100): character 1..6-grams, whitespace ignored (any language)."""
    return float(_chrf().corpus_score(list(predictions), [list(references)]).score)


class RougeTokenizer:
    """rouge-score tokenizer: lower-cased letter/digit runs, each CJK ideograph or kana on its own.
    On ASCII text the tokens are exactly rouge-score's default ones (no stemming)."""

    def tokenize(self, text: str) -> list[str]:
        """Tokens of `text` (rouge-score calls this for predictions and references alike)."""
        return _WORD.findall(_CJK.sub(r" \g<0> ", unicodedata.normalize("NFKC", text).lower()))


@lru_cache(maxsize=None)
def _rouge() -> Any:
    scorer = _lib("rouge_score.rouge_scorer", "rouge-score")
    return scorer.RougeScorer(["rougeL"], tokenizer=RougeTokenizer())


def rouge_l(prediction: str, reference: str) -> float:
    """rouge-score ROUGE-L F1 of one pair (0 when either side has no tokens)."""
    return float(_rouge().score(reference, prediction)["rougeL"].fmeasure)


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalised texts are equal."""
    return float(normalize(prediction) == normalize(reference))


def _version(module: str) -> str:
    from importlib.metadata import version

    return version(module)


def sources(references: list[str], labels: list[str] | None) -> dict[str, str]:
    """Which library computed each metric and how (sacrebleu's signatures); for the report."""
    bleu, chrf, one = _bleu(bleu_tokenizer(references)), _chrf(), references[:1]
    for metric in (bleu, chrf):  # sacrebleu knows "nrefs" (always 1 here) only once it has scored
        metric.corpus_score(one, [one])
    out = {
        "bleu": f"sacrebleu {bleu.get_signature()}",
        "chrf": f"sacrebleu {chrf.get_signature()}",
        "rouge_l": f"rouge-score {_version('rouge-score')} rougeL F1, mean over pairs; tokens: lower-cased "
                   "letter/digit runs, each CJK character one token (= rouge-score's default on ASCII)",
        "exact_match": "qlocal: equal after NFKC, lower-casing and dropping punctuation",
    }
    if labels:
        _lib("sklearn", "scikit-learn")
        out["labels"] = (f"scikit-learn {_version('scikit-learn')}: accuracy_score, "
                         "precision_recall_fscore_support (per class, macro; zero_division=0), confusion_matrix")
    return out


def text_metrics(predictions: list[str], references: list[str], labels: list[str] | None) -> dict[str, Any]:
    """ROUGE-L (mean F1), BLEU and chrF (corpus, 0-100) and exact match (mean); the label metrics
    of `classification` too when `labels` is given."""
    n = max(len(references), 1)
    out: dict[str, Any] = {
        "rouge_l": sum(rouge_l(p, r) for p, r in zip(predictions, references)) / n,
        "bleu": corpus_bleu(predictions, references),
        "chrf": corpus_chrf(predictions, references),
        "exact_match": sum(exact_match(p, r) for p, r in zip(predictions, references)) / n,
    }
    if labels:
        out.update(classification(predictions, references, labels))
    return out


# --------------------------------------------------------------------------------------------
# Labels


MAX_LABELS = 20
MAX_LABEL_TOKENS = 4
NO_LABEL = "(none)"
"""The confusion matrix's column for generations that name no label (normalised labels have no "(")."""


def label_set(references: list[str], known: Iterable[str] | None = None) -> list[str] | None:
    """The labels, when the references are labels; else None.

    Known labels (a data.label_map's answers) always are. Otherwise the rule is: at least 4
    references, every one at most 4 tokens long, and between 2 and min(20, n/2) distinct values
    (after normalisation), i.e. a few short answers that repeat.
    """
    if known:
        return sorted({normalize(k) for k in known})
    norm = [normalize(r) for r in references]
    distinct = set(norm)
    if len(norm) < 4 or any(not r or len(tokenize(r)) > MAX_LABEL_TOKENS for r in norm):
        return None
    if not 2 <= len(distinct) <= min(MAX_LABELS, len(norm) // 2):
        return None
    return sorted(distinct)


def predicted_label(prediction: str, labels: list[str]) -> str | None:
    """The label a free-text prediction names: an exact (normalised) match, else the label that
    appears first in it (the longest one on a tie), else None."""
    p = normalize(prediction)
    if p in labels:
        return p
    found = [(p.find(lab), -len(lab), lab) for lab in labels if lab and lab in p]
    return min(found)[2] if found else None


def classification(predictions: list[str], references: list[str], labels: list[str]) -> dict[str, Any]:
    """scikit-learn's accuracy, per-class and macro precision/recall/F1 and confusion matrix.

    Classes are the labels that occur in the references or predictions, in `labels` order
    (references outside `labels` after them); a generation that names no label is wrong for its
    reference and is the confusion matrix's last column, NO_LABEL. Rows are references.
    """
    metrics = _lib("sklearn.metrics", "scikit-learn")
    pred = [predicted_label(p, labels) or NO_LABEL for p in predictions]
    gold = [normalize(r) for r in references]
    classes = [c for c in labels if c in gold or c in pred] + sorted(set(gold) - set(labels))
    p, r, f, support = metrics.precision_recall_fscore_support(gold, pred, labels=classes, zero_division=0)
    mp, mr, mf, _ = metrics.precision_recall_fscore_support(gold, pred, labels=classes, average="macro", zero_division=0)
    matrix = metrics.confusion_matrix(gold, pred, labels=classes + [NO_LABEL])[: len(classes)]
    return {
        "accuracy": float(metrics.accuracy_score(gold, pred)),
        "macro_precision": float(mp), "macro_recall": float(mr), "macro_f1": float(mf),
        "per_class": {c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(support[i])}
                      for i, c in enumerate(classes)},
        "confusion_matrix": {"rows": "reference", "columns": "predicted", "labels": classes,
                             "predicted": classes + [NO_LABEL], "matrix": matrix.tolist()},
    }


def _width(text: str) -> int:
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def _cell(text: str, width: int, left: bool = False) -> str:
    pad = " " * max(width - _width(text), 0)
    return text + pad if left else pad + text


def label_table(metrics: dict[str, Any], title: str) -> list[str]:
    """Per-class precision/recall/F1 and the confusion matrix of one metrics dict, as text lines
    (CJK labels padded by display width)."""
    per, cm = metrics.get("per_class"), metrics.get("confusion_matrix")
    if not per or not cm:
        return []
    w = max([_width(c) for c in cm["predicted"]] + [8]) + 2
    lines = [f"{title}: per class", _cell("label", w, True) + "".join(_cell(h, 11) for h in
                                                                     ("precision", "recall", "f1", "support"))]
    for c, v in per.items():
        lines.append(_cell(c, w, True) + "".join(f"{v[k]:>11.4f}" for k in ("precision", "recall", "f1"))
                     + f"{v['support']:>11d}")
    lines += ["", f"{title}: confusion matrix (rows: reference, columns: predicted)",
              _cell("", w, True) + "".join(_cell(c, w) for c in cm["predicted"])]
    for c, row in zip(cm["labels"], cm["matrix"]):
        lines.append(_cell(c, w, True) + "".join(_cell(str(n), w) for n in row))
    return lines
