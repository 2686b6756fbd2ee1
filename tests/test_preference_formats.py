"""Preference records (qlocal.data.pref_formats): shapes detected by keys, normalisation, errors,
data.columns, KTO labels, and `qlocal data check` on pairs."""

from __future__ import annotations

import json
import os
import types
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from qlocal.data.formats import load_samples
from qlocal.data.pref_formats import detect_preference, load_preference, normalise_preference
from qlocal.data.preference import KTOSample, PairSample, render_pair, render_preference
from qlocal.errors import UserError

DATA = Path(__file__).resolve().parent.parent / "data"
TEMPLATES = Path(__file__).resolve().parent / "assets" / "chat_templates"

Q = "Why is the sky blue?"
GOOD, BAD = "Air scatters blue light the most.", "No idea, look it up."


def cfg(**kw: Any) -> Any:
    base = dict(format="auto", split="train", skip_bad_lines=False, columns={}, tools=None, prompt_template=None,
                response_template=None, system_prompt=None, label_map={}, max_seq_len=1024, train_on_reasoning=True,
                train_on_prompt=False)
    return types.SimpleNamespace(**{**base, **kw})


def write(tmp_path: Path, *records: object, name: str = "p.jsonl") -> str:
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(p)


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def bot(text: str) -> dict:
    return {"role": "assistant", "content": text}


# ---- shapes ------------------------------------------------------------------------------------


def test_sample_files() -> None:
    pairs, stats = load_preference(str(DATA / "prefs_sample.jsonl"), "dpo", cfg())
    assert stats["counts"] == {"pairs": 80} and stats["skipped"] == 0 and not stats["unpaired"]
    assert all(isinstance(p, PairSample) and p.chosen[0]["content"].startswith("Sure") for p in pairs)
    assert sum(p.prompt[0]["role"] == "system" for p in pairs) == 10
    kto, stats = load_preference(str(DATA / "kto_sample.jsonl"), "kto", cfg())
    assert stats["counts"] == {"kto": 80} and 20 < sum(s.label for s in kto) < 60
    # Polite answers are the desirable ones, in both files.
    assert all(s.completion[0]["content"].startswith("Sure") == s.label for s in kto)


def test_strings_and_trl_conversational_give_the_same_pair() -> None:
    strings = normalise_preference({"prompt": Q, "chosen": GOOD, "rejected": BAD, "system": "Be brief."}, "pairs", "f:1")
    chat = normalise_preference({"prompt": [{"role": "system", "content": "Be brief."}, user(Q)],
                                 "chosen": [bot(GOOD)], "rejected": [bot(BAD)]}, "pairs", "f:1")
    sharegpt = normalise_preference({"prompt": [{"from": "human", "value": Q}], "system": "Be brief.",
                                     "chosen": [{"from": "gpt", "value": GOOD}], "rejected": BAD}, "pairs", "f:1")
    assert strings == chat == sharegpt
    assert strings.prompt == [{"role": "system", "content": "Be brief."}, user(Q)]
    assert (strings.chosen, strings.rejected) == ([bot(GOOD)], [bot(BAD)])


def test_whole_conversations_split_at_the_shared_prefix() -> None:
    history = [user("Hi"), bot("Hello! How can I help?"), user(Q)]
    rec = {"chosen": history + [bot(GOOD)], "rejected": history + [bot(BAD)]}
    assert detect_preference(rec) == "pairs_implicit"
    pair = normalise_preference(rec, "pairs_implicit", "f:2")
    assert pair.prompt == history and pair.chosen == [bot(GOOD)] and pair.rejected == [bot(BAD)]
    # UltraFeedback (binarized) keeps the prompt string beside the conversations.
    uf = {"prompt": Q, "prompt_id": "x", "chosen": [user(Q), bot(GOOD)], "rejected": [user(Q), bot(BAD)],
          "messages": [user(Q), bot(GOOD)], "score_chosen": 8.0, "score_rejected": 3.0}
    assert detect_preference(uf) == "pairs_implicit"
    assert normalise_preference(uf, "pairs_implicit", "f:3") == PairSample([user(Q)], [bot(GOOD)], [bot(BAD)], "f:3")
    # A multi-turn answer after the shared prefix stays whole.
    longer = {"chosen": [user(Q), bot(GOOD), user("Sure?"), bot("Yes.")], "rejected": [user(Q), bot(BAD)]}
    assert len(normalise_preference(longer, "pairs_implicit", "f:4").chosen) == 3


def test_kto_records_and_labels(tmp_path: Path) -> None:
    rec = {"prompt": Q, "completion": GOOD, "label": True}
    assert detect_preference(rec) == "kto"
    assert normalise_preference(rec, "kto", "f:1") == KTOSample([user(Q)], [bot(GOOD)], True, "f:1")
    csv = tmp_path / "k.csv"
    csv.write_text(f"prompt,completion,label\n{Q},{GOOD},true\n{Q},\"{BAD}\",False\n", encoding="utf-8")
    samples, _ = load_preference(str(csv), "kto", cfg())
    assert [s.label for s in samples] == [True, False]
    # Pairs trained with kto are unpaired: chosen desirable, rejected undesirable.
    path = write(tmp_path, {"prompt": Q, "chosen": GOOD, "rejected": BAD})
    unpaired, stats = load_preference(path, "kto", cfg())
    assert stats["unpaired"] and [(s.completion[0]["content"], s.label) for s in unpaired] == [(GOOD, True), (BAD, False)]


def test_columns_map_other_names(tmp_path: Path) -> None:
    path = write(tmp_path, {"question": Q, "good": GOOD, "bad": BAD, "sys": "Be brief."})
    pairs, _ = load_preference(path, "dpo", cfg(columns={"prompt": "question", "chosen": "good", "rejected": "bad",
                                                         "system": "sys"}))
    assert pairs[0] == PairSample([{"role": "system", "content": "Be brief."}, user(Q)], [bot(GOOD)], [bot(BAD)],
                                  pairs[0].where)
    with pytest.raises(UserError, match=r"p.jsonl:1: column 'better' \(data.columns.chosen\) is missing"):
        load_preference(path, "dpo", cfg(columns={"prompt": "question", "chosen": "better", "rejected": "bad"}))
    with pytest.raises(UserError, match="data.columns.user: preference data maps prompt, chosen, rejected"):
        load_preference(path, "dpo", cfg(columns={"user": "question"}))
    with pytest.raises(UserError, match="data.prompt_template builds SFT turns"):
        load_preference(path, "dpo", cfg(prompt_template="{question}"))


# ---- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("record,msg", [
    ({"prompt": Q, "chosen": GOOD}, r"f.jsonl:2: missing 'rejected' \(a preference pair needs both"),
    ({"prompt": Q, "chosen": GOOD, "rejected": GOOD}, r"f.jsonl:2: 'chosen' and 'rejected' are identical"),
    ({"chosen": [user(Q), bot(GOOD)], "rejected": [user(Q), bot(GOOD)]}, "f.jsonl:2: 'chosen' and 'rejected' are identical"),
    ({"prompt": Q, "chosen": "", "rejected": BAD}, "f.jsonl:2: 'chosen' is empty"),
    ({"prompt": Q, "chosen": 3, "rejected": BAD}, "f.jsonl:2: 'chosen' must be a string or a list of messages, got int"),
    ({"prompt": [user(Q), bot("x")], "chosen": GOOD, "rejected": BAD}, "f.jsonl:2: 'prompt' ends with an assistant turn"),
    ({"chosen": [user("a"), bot(GOOD)], "rejected": [user("b"), bot(BAD)]}, "share no prompt turns"),
    ({"chosen": [user(Q), bot(GOOD)], "rejected": [user(Q)]}, "'rejected' is only the shared prompt"),
    ({"chosen": [user(Q), bot(GOOD), user("x"), bot("y")], "rejected": [user(Q), bot(GOOD), bot("z")]},
     "differ at turn 3, a user turn"),
    ({"prompt": "Other?", "chosen": [user(Q), bot(GOOD)], "rejected": [user(Q), bot(BAD)]},
     "'prompt' is not the conversations' last shared user turn"),
    ({"prompt": Q, "completion": GOOD, "label": 1}, r"f.jsonl:2: 'label' must be true \(desirable\) or false \(undesirable\), got 1"),
    ({"prompt": Q, "completion": GOOD, "label": "yes"}, "'label' must be true"),
    ({"prompt": Q, "chosen": [{"role": "robot", "content": GOOD}], "rejected": BAD}, "f.jsonl:2: 'chosen\\[0\\].role' is 'robot'"),
    ({"question": Q}, r"f.jsonl:2: not preference data \(keys: question\); train.method=dpo needs"),
])
def test_bad_records_name_the_line(tmp_path: Path, record: dict, msg: str) -> None:
    first = {"prompt": "Hi", "chosen": "Hello.", "rejected": "What?"}
    if "label" in record:
        first = {"prompt": "Hi", "completion": "Hello.", "label": True}
    path = write(tmp_path, first, record, name="f.jsonl")
    with pytest.raises(UserError, match=msg):
        load_preference(path, "kto" if "label" in record else "dpo", cfg())
    # --skip-bad-lines counts it and keeps the good record.
    samples, stats = load_preference(path, "kto" if "label" in record else "dpo", cfg(skip_bad_lines=True))
    assert len(samples) == 1 and stats["skipped"] == 1 and stats["skipped_where"][0].endswith("f.jsonl:2")


def test_kinds_and_methods_must_match(tmp_path: Path) -> None:
    mixed = write(tmp_path, {"prompt": Q, "chosen": GOOD, "rejected": BAD}, {"prompt": Q, "completion": GOOD, "label": True})
    with pytest.raises(UserError, match=r"p.jsonl:2: record is kto but the file's first record .* is pairs"):
        load_preference(mixed, "dpo", cfg())
    kto = write(tmp_path, {"prompt": Q, "completion": GOOD, "label": True}, name="k.jsonl")
    with pytest.raises(UserError, match="holds KTO records .* train.method=orpo needs pairs"):
        load_preference(kto, "orpo", cfg())
    with pytest.raises(UserError, match="data.format 'alpaca' is SFT data"):
        load_preference(kto, "kto", cfg(format="alpaca"))
    # SFT on preference data says which method reads it, instead of a generic key error.
    pairs = write(tmp_path, {"prompt": Q, "chosen": GOOD, "rejected": BAD}, name="d.jsonl")
    with pytest.raises(UserError, match=r"d.jsonl:1: a preference pair .* --method dpo"):
        load_samples(pairs)
    with pytest.raises(UserError, match=r"k.jsonl:1: prompt \+ completion \+ a true/false label is KTO data"):
        load_samples(kto)


# ---- rendering the loaded data -------------------------------------------------------------------


def test_render_preference_counts(tokenizer_dir: Any, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir("qwen2")))
    template = (TEMPLATES / "qwen2.5.jinja").read_text(encoding="utf-8")
    pairs, _ = load_preference(str(DATA / "prefs_sample.jsonl"), "dpo", cfg())
    full, counts = render_preference(pairs, tok, template, None)
    assert len(full) == 80 and counts == {"truncated": 0, "dropped_long": 0, "unscored": 0, "split_render": 0}
    # Chosen and rejected of every pair share the prompt's tokens exactly (one prompt_ids per pair)
    # and differ right after it.
    assert all(e.chosen_ids[0] != e.rejected_ids[0] for e in full)
    longest = max(e.length for e in full)
    cut, counts = render_preference(pairs, tok, template, longest - 10)
    assert counts["truncated"] > 0 and len(cut) == 80 and max(e.length for e in cut) <= longest - 10
    kept, counts = render_preference(pairs, tok, template, longest - 10, drop_long=True)
    assert counts["dropped_long"] == 80 - len(kept) > 0 and counts["truncated"] == 0
    # The rendered pair of a whole-conversation record equals that of its explicit form.
    implicit = normalise_preference({"chosen": [user(Q), bot(GOOD)], "rejected": [user(Q), bot(BAD)]}, "pairs_implicit", "f")
    explicit = normalise_preference({"prompt": Q, "chosen": GOOD, "rejected": BAD}, "pairs", "f")
    assert render_pair(implicit, tok, template) == render_pair(explicit, tok, template)


def test_data_check_shows_pairs(tokenizer_dir: Any, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from qlocal.data.check import check_report

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir("gemma3")))
    template = (TEMPLATES / "gemma3.jinja").read_text(encoding="utf-8")
    report = check_report(str(DATA / "prefs_sample.jsonl"), tok, template, cfg(max_seq_len=80))
    assert "prefs_sample.jsonl: 80 records (pairs: 80)" in report
    assert "chosen is shorter in every pair" in report
    assert "exceed max_seq_len=80 (prompt + longer answer) and will be truncated" in report
    shown = report.split("scored spans in [[ ]]), chosen:")[1]
    chosen, rejected = shown.split("\nrejected:\n")
    assert chosen.count("[[") == 1 and "<start_of_turn>model\n[[Sure" in chosen
    assert rejected.count("[[") == 1 and "]]" in rejected and "<start_of_turn>user" in rejected.split("[[")[0]
    kto = check_report(str(DATA / "kto_sample.jsonl"), tok, template, cfg())
    assert "80 records (kto: 80)" in kto and "desirable" in kto
    unpaired = check_report(str(DATA / "prefs_sample.jsonl"), tok, template, cfg(), method="kto")
    assert "unpaired for kto: 160 examples" in unpaired and "labels: 80 desirable, 80 undesirable" in unpaired


def test_cli_data_check_and_one_line_errors(qlocal_cli: Any, tiny_model_dir: Any, tmp_path: Path) -> None:
    model = tiny_model_dir("qwen2")
    res = qlocal_cli("data", "check", str(DATA / "prefs_sample.jsonl"), "--model", model, "--method", "dpo")
    assert res.returncode == 0, res.stderr
    assert "80 records (pairs: 80)" in res.stdout and "[[Sure" in res.stdout
    bad = write(tmp_path, {"prompt": Q, "chosen": GOOD, "rejected": BAD}, {"prompt": Q, "chosen": GOOD})
    res = qlocal_cli("data", "check", bad, "--model", model)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert lines == [f"error: {bad}:2: missing 'rejected' (a preference pair needs both chosen and rejected); "
                     "fix the record or pass --skip-bad-lines"]
    kto = write(tmp_path, {"prompt": Q, "completion": GOOD, "label": "maybe"}, name="k.jsonl")
    res = qlocal_cli("data", "check", kto, "--model", model, "--method", "kto")
    assert res.returncode == 2 and res.stderr.strip().startswith(f"error: {kto}:1: 'label' must be true")
