"""Tool and reasoning records in every accepted spelling normalise to one internal form
(qlocal.data.tools); each malformed field is a one-line error naming the record and the field."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from qlocal.data.formats import normalise
from qlocal.data.tools import parse_tools, split_think
from qlocal.errors import UserError
from tool_helpers import TOOLS, WEATHER

CALL = {"id": "a1B2c3D4e", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}


def msgs(*turns: dict) -> dict:
    return {"messages": [{"role": "user", "content": "Weather in Paris?"}, *turns]}


def test_openai_calls_in_every_spelling_are_one_form() -> None:
    want = normalise(msgs({"role": "assistant", "content": "", "tool_calls": [CALL]},
                          {"role": "tool", "tool_call_id": "a1B2c3D4e", "name": "get_weather", "content": "18 C"},
                          {"role": "assistant", "content": "18 C."}), "messages", "f:1").messages
    assert want[1] == {"role": "assistant", "content": "", "tool_calls": [CALL]}
    assert want[2] == {"role": "tool", "content": "18 C", "tool_call_id": "a1B2c3D4e", "name": "get_weather"}
    string_args = {**CALL, "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    for call_turn in ({"role": "assistant", "content": None, "tool_calls": [string_args]},
                      {"role": "assistant", "tool_calls": [{"id": "a1B2c3D4e", "name": "get_weather", "arguments": {"city": "Paris"}}]},
                      {"role": "assistant", "content": None, "tool_calls": [CALL]}):
        got = normalise(msgs(call_turn, {"role": "tool", "content": "18 C"}, {"role": "assistant", "content": "18 C."}),
                        "messages", "f:2").messages
        assert got == want  # result linked to the call by position: id and name filled in
    legacy = normalise(msgs({"role": "assistant", "content": None, "function_call": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                            {"role": "function", "name": "get_weather", "content": "18 C"},
                            {"role": "assistant", "content": "18 C."}), "messages", "f:3").messages
    assert legacy[1]["tool_calls"][0]["function"] == CALL["function"] and legacy[2]["role"] == "tool"


def test_text_before_a_call_and_parallel_calls_get_ids() -> None:
    two = [{"function": {"name": "get_weather", "arguments": {"city": c}}} for c in ("Paris", "Rome")]
    got = normalise(msgs({"role": "assistant", "content": "Checking both.", "tool_calls": two},
                         {"role": "tool", "content": {"temp": 18}}, {"role": "tool", "content": "25"},
                         {"role": "assistant", "content": "Rome is warmer."}), "messages", "f:1").messages
    assert got[1]["content"] == "Checking both."
    ids = [c["id"] for c in got[1]["tool_calls"]]
    assert ids == ["call00001", "call00002"] and all(re.fullmatch(r"[A-Za-z0-9]{9}", i) for i in ids)  # Mistral's rule
    assert [(m["tool_call_id"], m["content"]) for m in got[2:4]] == [("call00001", '{"temp": 18}'), ("call00002", "25")]


def test_sharegpt_function_call_and_observation() -> None:
    rec = {"conversations": [{"from": "human", "value": "Paris and Rome?"},
                             {"from": "function_call", "value": json.dumps([{"name": "get_weather", "arguments": {"city": "Paris"}},
                                                                            {"name": "get_weather", "arguments": {"city": "Rome"}}])},
                             {"from": "observation", "value": json.dumps(["18 C", {"temp": 25}])},
                             {"from": "gpt", "value": "Rome is warmer."}],
           "tools": json.dumps([WEATHER["function"]]), "system": "Use tools."}
    s = normalise(rec, "sharegpt", "g:1")
    assert s.tools == [WEATHER] and s.messages[0] == {"role": "system", "content": "Use tools."}
    assert [m["role"] for m in s.messages] == ["system", "user", "assistant", "tool", "tool", "assistant"]
    assert [m["content"] for m in s.messages[3:5]] == ["18 C", '{"temp": 25}']  # one array answers both calls
    one = normalise({"conversations": [rec["conversations"][0], {"from": "function_call", "value": {"name": "get_weather", "arguments": {}}},
                                       {"from": "observation", "value": "[1, 2]"}, {"from": "gpt", "value": "ok"}]}, "sharegpt", "g:2")
    assert one.messages[2]["content"] == "[1, 2]"  # a single call's result is never split


def test_reasoning_spellings() -> None:
    for key in ("reasoning_content", "reasoning", "thinking"):
        m = normalise(msgs({"role": "assistant", "content": "Yes.", key: "\nThink.\n"}), "messages", "f:1").messages[1]
        assert m == {"role": "assistant", "content": "Yes.", "reasoning_content": "Think."}
    assert split_think("<think>\nA\n</think>\n\nB") == ("A", "B")
    assert split_think("no <think>here</think>") == (None, "no <think>here</think>")
    field_wins = normalise(msgs({"role": "assistant", "content": "<think>old</think>Yes.", "reasoning_content": "new"}),
                           "messages", "f:2").messages[1]
    assert field_wins == {"role": "assistant", "content": "Yes.", "reasoning_content": "new"}


def test_tools_in_both_shapes() -> None:
    assert parse_tools(TOOLS, "t") == TOOLS
    assert parse_tools(json.dumps([t["function"] for t in TOOLS]), "t") == TOOLS
    assert parse_tools([], "t") is None and parse_tools(None, "t") is None


@pytest.mark.parametrize("record, match", [
    (msgs({"role": "assistant", "content": None}), r"'messages\[1\]' has no 'content' and no 'tool_calls'"),
    (msgs({"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{city: Paris}"}}]}),
     r"'messages\[1\]\.tool_calls\[0\]\.arguments' is not valid JSON"),
    (msgs({"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}),
     r"'messages\[1\]\.tool_calls\[0\]\.arguments' must be a JSON object of arguments, got list"),
    (msgs({"role": "assistant", "tool_calls": [{"function": {"arguments": {}}}]}),
     r"'messages\[1\]\.tool_calls\[0\]' must be a call with a function 'name'"),
    (msgs({"role": "assistant", "content": "x"}, {"role": "tool", "content": None}),
     r"'messages\[2\]' has no 'content' \(the tool's result\)"),
    ({**msgs({"role": "assistant", "content": "x"}), "tools": "[{bad"}, r"'tools' is not valid JSON"),
    ({**msgs({"role": "assistant", "content": "x"}), "tools": [{"type": "function", "function": {"description": "d"}}]},
     r"'tools\[0\]' must be a function schema with a 'name'"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "get_weather(Paris)"}]},
     r"'conversations\[1\]\.value' is not valid JSON"),
])
def test_bad_tool_fields_name_the_record_and_field(record: dict, match: str) -> None:
    fmt = "sharegpt" if "conversations" in record else "messages"
    with pytest.raises(UserError, match=r"^b\.jsonl:3: " + match + r".*--skip-bad-lines"):
        normalise(record, fmt, "b.jsonl:3")


def test_mapping_carries_tools(tmp_path: Path) -> None:
    from qlocal import config as config_mod
    from qlocal.data.formats import load_samples
    from qlocal.data.mapping import mapping_from_config

    def load(records: list[dict], **keys: object) -> list:
        path = tmp_path / "m.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        cfg = config_mod.apply(config_mod.Config(), {"data": keys}, "test")
        return load_samples(str(path), mapping=mapping_from_config(cfg.data))[0]

    chat = msgs({"role": "assistant", "content": None, "tool_calls": [CALL]}, {"role": "tool", "content": "18 C"},
                {"role": "assistant", "content": "18 C."})["messages"]
    renamed = load([{"dialog": chat, "functions": json.dumps([WEATHER["function"]])}],
                   columns={"messages": "dialog", "tools": "functions"})
    assert renamed[0].tools == [WEATHER] and renamed[0].messages[1]["tool_calls"] == [CALL]
    assert load([{"dialog": chat, "tools": [WEATHER]}], columns={"messages": "dialog"})[0].tools == [WEATHER]
    built = load([{"q": "Hi", "a": "Hello", "fns": [WEATHER]}], columns={"user": "q", "assistant": "a", "tools": "fns"})
    assert built[0].tools == [WEATHER]
    with pytest.raises(UserError, match="data.columns.tools does not apply to raw text"):
        load([{"t": "x"}], columns={"text": "t", "tools": "fns"})
