"""Text metrics for `qlocal eval`: ROUGE-L, BLEU-4, exact match, accuracy and macro-F1. Pure Python.

Tokens: every CJK ideograph and kana character is a token of its own (character level, as sacrebleu's
`zh` tokenizer does and as is usual for Chinese and Japanese, which have no spaces); runs of other
letters/digits are word tokens; each punctuation mark is a token. So English is scored by words,
Chinese/Japanese by characters, and mixed text by both, with one rule.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from typing import Iterable

# CJK unified ideographs (+ext A, compatibility), hiragana, katakana (+phonetic ext, half-width), ext B-F.
_CJK = re.compile("[\u3040-\u30ff\u31f0-\u31ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff66-\uff9f"
                  "\U00020000-\U0002fa1f]")
_TOKEN = re.compile(r"\w+|[^\w\s]")


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


def _lcs(a: list[str], b: list[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 of one pair, on normalised tokens (1.0 when both are empty)."""
    p, r = tokenize(normalize(prediction)), tokenize(normalize(reference))
    if not p or not r:
        return float(not p and not r)
    lcs = _lcs(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def corpus_bleu(predictions: Iterable[str], references: Iterable[str], max_n: int = 4) -> float:
    """Corpus BLEU-4 (0-100) with one reference per prediction, case-sensitive, on `tokenize` tokens.

    Smoothing is sacrebleu's default ("exp": the k-th n-gram order with no match counts as
    1 / (2^k * total)); orders no hypothesis is long enough for are left out (effective order),
    so a corpus of two-character answers still gets a score.
    """
    matches, totals = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for pred, ref in zip(predictions, references):
        p, r = tokenize(pred), tokenize(ref)
        hyp_len, ref_len = hyp_len + len(p), ref_len + len(r)
        for n in range(1, max_n + 1):
            hyp, rc = _ngrams(p, n), _ngrams(r, n)
            matches[n - 1] += sum(min(c, rc[g]) for g, c in hyp.items())
            totals[n - 1] += max(len(p) - n + 1, 0)
    if hyp_len == 0:
        return 0.0
    log_precisions, smooth = [], 1.0
    for m, t in zip(matches, totals):
        if t == 0:
            break
        if m == 0:
            smooth *= 2
            log_precisions.append(math.log(1.0 / (smooth * t)))
        else:
            log_precisions.append(math.log(m / t))
    brevity = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return 100.0 * brevity * math.exp(sum(log_precisions) / len(log_precisions))


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalised texts are equal."""
    return float(normalize(prediction) == normalize(reference))


# --------------------------------------------------------------------------------------------
# Classification


MAX_LABELS = 20
MAX_LABEL_TOKENS = 4


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


def classification(predictions: list[str], references: list[str], labels: list[str]) -> dict[str, float]:
    """Accuracy and macro-F1 (over the labels that occur in references or predictions)."""
    pred = [predicted_label(p, labels) for p in predictions]
    gold = [normalize(r) for r in references]
    accuracy = sum(p == g for p, g in zip(pred, gold)) / max(len(gold), 1)
    classes = sorted({g for g in gold} | {p for p in pred if p is not None})
    f1s = []
    for c in classes:
        tp = sum(p == c and g == c for p, g in zip(pred, gold))
        fp = sum(p == c and g != c for p, g in zip(pred, gold))
        fn = sum(p != c and g == c for p, g in zip(pred, gold))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return {"accuracy": accuracy, "macro_f1": sum(f1s) / len(f1s) if f1s else 0.0}


def text_metrics(predictions: list[str], references: list[str], labels: list[str] | None) -> dict[str, float]:
    """ROUGE-L (mean F1), corpus BLEU-4 and exact match (means, 0-1 except BLEU 0-100); accuracy
    and macro-F1 too when `labels` is given."""
    n = max(len(references), 1)
    out = {
        "rouge_l": sum(rouge_l(p, r) for p, r in zip(predictions, references)) / n,
        "bleu": corpus_bleu(predictions, references),
        "exact_match": sum(exact_match(p, r) for p, r in zip(predictions, references)) / n,
    }
    if labels:
        out.update(classification(predictions, references, labels))
    return out
