"""Loading (qlocal.data.readers), format detection and normalisation (qlocal.data.formats) of training records."""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from qlocal.data.formats import Sample, detect_format, load_samples, normalise
from qlocal.data.readers import load_records, looks_like_hub_id
from qlocal.errors import UserError

DATA = Path(__file__).resolve().parent.parent / "data"


def write(tmp_path: Path, name: str, content: str | bytes) -> str:
    p = tmp_path / name
    if isinstance(content, bytes):
        p.write_bytes(content)
    else:
        p.write_text(content, encoding="utf-8")
    return str(p)


def jsonl(*records: object) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


# ---- the bundled samples -------------------------------------------------------------------


@pytest.mark.parametrize("name,fmt", [
    ("alpaca_sample.jsonl", "alpaca"), ("alpaca_sample.csv", "alpaca"), ("sharegpt_sample.json", "sharegpt"),
    ("messages_sample.jsonl", "messages"), ("completion_sample.jsonl", "completion"), ("text_sample.jsonl", "text"),
])
def test_sample_files_detected(name: str, fmt: str) -> None:
    samples, stats = load_samples(str(DATA / name))
    assert stats["format"] == fmt
    assert stats["counts"] == {fmt: len(samples)} and stats["skipped"] == 0
    assert len(samples) >= (10 if name.endswith(".csv") else 40)
    kind = "text" if fmt == "text" else "chat"
    assert all(s.kind == kind for s in samples)
    if kind == "chat":
        assert all(any(m["role"] == "assistant" for m in s.messages) for s in samples)
        assert all(isinstance(m["content"], str) and m["content"] for s in samples for m in s.messages)


def test_locations() -> None:
    recs = load_records(str(DATA / "alpaca_sample.jsonl"))
    assert recs[0][1].endswith("alpaca_sample.jsonl:1") and recs[4][1].endswith(":5")
    assert load_records(str(DATA / "sharegpt_sample.json"))[3][1].endswith("sharegpt_sample.json:[3]")
    assert load_records(str(DATA / "alpaca_sample.csv"))[0][1].endswith("alpaca_sample.csv:2")


# ---- file variants ---------------------------------------------------------------------------


def test_json_variants(tmp_path: Path) -> None:
    rec = {"text": "hello"}
    wrapped = write(tmp_path, "w.json", json.dumps({"data": [rec, rec]}))
    assert [w for _, w in load_records(wrapped)] == [f"{wrapped}:[0]", f"{wrapped}:[1]"]
    lines = write(tmp_path, "l.json", jsonl(rec, rec, rec))
    assert [w for _, w in load_records(lines)][-1] == f"{lines}:3"


def test_csv_multiline_cell_location(tmp_path: Path) -> None:
    path = write(tmp_path, "a.csv", 'instruction,input,output\nq1,,"a\nb"\nq2,,c\n')
    recs = load_records(path)
    assert recs[0][0]["output"] == "a\nb"
    assert [w for _, w in recs] == [f"{path}:2", f"{path}:4"]


def test_parquet(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = str(tmp_path / "d.parquet")
    pq.write_table(pa.table({"prompt": ["p1", "p2"], "completion": ["c1", "c2"]}), path)
    samples, stats = load_samples(path)
    assert stats["format"] == "completion" and samples[1].messages[1]["content"] == "c2"
    assert samples[1].where == f"{path}:row 1"


def test_hub_id(monkeypatch: pytest.MonkeyPatch) -> None:
    assert looks_like_hub_id("tatsu-lab/alpaca")
    assert not looks_like_hub_id("data/missing.jsonl") and not looks_like_hub_id("missing.jsonl")
    calls = []

    def load_dataset(name: str, split: str) -> list[dict]:
        calls.append((name, split))
        return [{"instruction": "q", "output": "a"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    samples, stats = load_samples("someorg/somedata", split="test")
    assert calls == [("someorg/somedata", "test")] and stats["format"] == "alpaca"
    assert samples[0].where == "someorg/somedata[test]:row 0"

    def broken(name: str, split: str) -> None:
        raise FileNotFoundError("Dataset 'someorg/nothing' doesn't exist on the Hub")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=broken))
    with pytest.raises(UserError, match="someorg/nothing"):
        load_records("someorg/nothing")


# ---- errors name the file and line ------------------------------------------------------------


def test_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"nope\.jsonl: file not found"):
        load_records(str(tmp_path / "nope.jsonl"))


def test_empty_file(tmp_path: Path) -> None:
    path = write(tmp_path, "e.jsonl", "\n  \n")
    with pytest.raises(UserError, match=r"e\.jsonl: empty file"):
        load_records(path)


def test_unsupported_extension(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"x\.txt: unsupported file type"):
        load_records(write(tmp_path, "x.txt", "hello"))


def test_malformed_json_line(tmp_path: Path) -> None:
    path = write(tmp_path, "bad.jsonl", jsonl({"text": "a"}, {"text": "b"}) + '{"text": "c",\n' + jsonl({"text": "d"}))
    with pytest.raises(UserError, match=r"bad\.jsonl:3: not valid JSON .*--skip-bad-lines"):
        load_samples(path)
    samples, stats = load_samples(path, skip_bad_lines=True)
    assert len(samples) == 3 and stats["skipped"] == 1 and stats["skipped_where"] == [f"{path}:3"]


def test_malformed_json_array(tmp_path: Path) -> None:
    path = write(tmp_path, "bad.json", '[\n {"text": "a"},\n {"text": "b"\n]\n')
    with pytest.raises(UserError, match=r"bad\.json:4: not valid JSON"):
        load_records(path)


def test_non_utf8(tmp_path: Path) -> None:
    path = write(tmp_path, "latin.jsonl", jsonl({"text": "ok"}).encode() + '{"text": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(UserError, match=r"latin\.jsonl:2: not valid UTF-8"):
        load_records(path)


def test_record_not_object(tmp_path: Path) -> None:
    path = write(tmp_path, "list.jsonl", jsonl({"text": "a"}, ["not", "an", "object"]))
    with pytest.raises(UserError, match=r"list\.jsonl:2: a record must be a JSON object"):
        load_records(path)


def test_missing_and_mistyped_fields(tmp_path: Path) -> None:
    path = write(tmp_path, "x.jsonl", jsonl({"instruction": "q", "output": "a"}, {"instruction": "q", "output": 5}))
    with pytest.raises(UserError, match=r"x\.jsonl:2: 'output' must be a string \(alpaca record\)"):
        load_samples(path)
    path = write(tmp_path, "y.jsonl", jsonl({"prompt": "p", "completion": "c"}))
    with pytest.raises(UserError, match=r"y\.jsonl:1: missing 'instruction' \(alpaca record\)"):
        load_samples(path, fmt="alpaca")
    path = write(tmp_path, "z.jsonl", jsonl({"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]}))
    with pytest.raises(UserError, match=r"z\.jsonl:1: 'messages\[1\]\.role' is 'robot'"):
        load_samples(path)
    path = write(tmp_path, "w.jsonl", jsonl({"messages": [{"role": "user", "content": None}]}))
    with pytest.raises(UserError, match=r"w\.jsonl:1: 'messages\[0\]' has no 'content'"):
        load_samples(path)


def test_no_assistant_turn(tmp_path: Path) -> None:
    path = write(tmp_path, "n.jsonl", jsonl({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]}))
    with pytest.raises(UserError, match=r"n\.jsonl:1: the conversation has no assistant turn"):
        load_samples(path)


def test_empty_answers_are_found_and_train_warns_with_file_line(tmp_path: Path, capsys) -> None:
    """A blank assistant turn (alpaca output, completion, any chat turn) is named by file:line, and
    train's data loading prints one warning line per file; calls, reasoning and real answers are fine."""
    from qlocal import config as config_mod
    from qlocal.data.formats import empty_answers
    from qlocal.train_data import load_data

    path = write(tmp_path, "a.jsonl", jsonl({"instruction": "q", "output": "a"}, {"instruction": "q", "output": ""},
                                            {"instruction": "q", "output": " \n\t"},
                                            {"instruction": "q", "output": "a", "history": [["h", ""]]}))
    samples, _ = load_samples(path)
    assert empty_answers(samples) == [f"{path}:2", f"{path}:3", f"{path}:4"]
    chats = write(tmp_path, "m.jsonl", jsonl(
        {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "  "}]},
        {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": None,
                                                          "tool_calls": [{"name": "f", "arguments": {}}]},
                      {"role": "tool", "content": "1"}, {"role": "assistant", "content": "one"}]},
        {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "<think>hm</think>"}]},
        {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"},
                      {"role": "user", "content": "v"}, {"role": "assistant", "content": ""}]}))
    samples, _ = load_samples(chats)
    assert empty_answers(samples) == [f"{chats}:1", f"{chats}:4"]  # a call or reasoning alone is an answer
    for name, record in (("c.jsonl", {"prompt": "p", "completion": ""}),
                         ("s.jsonl", {"conversations": [{"from": "human", "value": "u"}, {"from": "gpt", "value": ""}]})):
        assert empty_answers(load_samples(write(tmp_path, name, jsonl(record)))[0]) == [f"{tmp_path / name}:1"]
    cfg = config_mod.build(flags={"data.path": path, "data.val_path": chats})
    load_data(cfg)  # trains them as written: a warning, not an error
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert err == [
        f"warning: 3 records in {path} have an empty assistant answer ({path}:2, {path}:3, {path}:4); training "
        "teaches the model to answer those with nothing: write the answer (alpaca 'output', the assistant turn's "
        "content) or remove the record",
        f"warning: 2 records in {chats} have an empty assistant answer ({chats}:1, {chats}:4); training teaches the "
        "model to answer those with nothing: write the answer (alpaca 'output', the assistant turn's content) or "
        "remove the record"]


def test_mixed_formats(tmp_path: Path) -> None:
    path = write(tmp_path, "mix.jsonl", jsonl({"instruction": "q", "output": "a"}, {"instruction": "q2", "output": "b"},
                                               {"text": "t"}, {"instruction": "q3", "output": "c"}))
    with pytest.raises(UserError, match=r"mix\.jsonl:3: record is text but the file's first record \(.*mix\.jsonl:1\) is alpaca"):
        load_samples(path)
    samples, stats = load_samples(path, skip_bad_lines=True)
    assert len(samples) == 3 and stats["skipped"] == 1 and stats["format"] == "alpaca"


def test_unknown_format_keys(tmp_path: Path) -> None:
    path = write(tmp_path, "u.jsonl", jsonl({"question": "q", "answer": "a"}))
    with pytest.raises(UserError, match=r"u\.jsonl:1: cannot tell the format from the keys \(answer, question\)"):
        load_samples(path)


# ---- normalisation -----------------------------------------------------------------------------


def test_detect_format() -> None:
    assert detect_format({"instruction": "i", "input": "", "output": "o"}) == "alpaca"
    assert detect_format({"conversations": []}) == "sharegpt"
    assert detect_format({"messages": [{"from": "human", "value": "x"}]}) == "sharegpt"
    assert detect_format({"messages": [{"role": "user", "content": "x"}]}) == "messages"
    assert detect_format({"prompt": "p", "completion": "c"}) == "completion"
    assert detect_format({"text": "t"}) == "text"
    assert detect_format({"instruction": "only"}) is None


def test_alpaca_normalise() -> None:
    rec = {"system": "S", "history": [["q0", "a0"]], "instruction": "Do it.", "input": "data", "output": "done"}
    s = normalise(rec, "alpaca", "f:1")
    assert s == Sample("chat", messages=[
        {"role": "system", "content": "S"}, {"role": "user", "content": "q0"}, {"role": "assistant", "content": "a0"},
        {"role": "user", "content": "Do it.\n\ndata"}, {"role": "assistant", "content": "done"}], where="f:1")
    assert normalise({"instruction": "i", "input": "  ", "output": "o"}, "alpaca", "f:2").messages[0]["content"] == "i"
    with pytest.raises(UserError, match=r"f:3: 'history' must be"):
        normalise({"instruction": "i", "output": "o", "history": [["only one"]]}, "alpaca", "f:3")


def test_sharegpt_and_messages_normalise() -> None:
    rec = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "q"},
                             {"from": "function_call", "value": '{"name": "answer", "arguments": {}}'},
                             {"from": "observation", "value": "42"}, {"from": "gpt", "value": "It is 42."}]}
    roles = [m["role"] for m in normalise(rec, "sharegpt", "f:1").messages]
    assert roles == ["system", "user", "assistant", "tool", "assistant"]
    rec["conversations"][2]["value"] = "call()"  # a function_call must be a JSON call (tests/test_tool_data.py)
    with pytest.raises(UserError, match=r"f:1: 'conversations\[2\]\.value' is not valid JSON"):
        normalise(rec, "sharegpt", "f:1")
    rec = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                        {"role": "assistant", "content": "c"}]}
    assert normalise(rec, "messages", "f:2").messages[0] == {"role": "user", "content": "ab"}
    comp = normalise({"prompt": "p", "completion": "c"}, "completion", "f:3")
    assert comp.messages == [{"role": "user", "content": "p"}, {"role": "assistant", "content": "c"}]
    assert normalise({"text": "t"}, "text", "f:4") == Sample("text", text="t", where="f:4")


def test_datasets_folder_and_hub_id(tmp_path) -> None:
    """The `datasets` path: a save_to_disk folder (a DatasetDict with splits) loads like a file;
    an unreachable hub id ends in one clear error naming it."""
    datasets = pytest.importorskip("datasets")
    rows = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(5)]
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                               "test": datasets.Dataset.from_list(rows[:2])})
    dd.save_to_disk(str(tmp_path / "ds"))
    samples, stats = load_samples(str(tmp_path / "ds"))
    assert len(samples) == 5 and stats["format"] == "alpaca"
    samples, _ = load_samples(str(tmp_path / "ds"), split="test")
    assert len(samples) == 2
    with pytest.raises(UserError, match="no split 'valid'"):
        load_samples(str(tmp_path / "ds"), split="valid")
    with pytest.raises(UserError, match="nobody-here/no-such-dataset"):
        load_samples("nobody-here/no-such-dataset")
