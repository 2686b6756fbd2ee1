"""`qlocal chat --tools` and `qlocal generate --tools` through the CLI: calls shown, results typed on
stdin, calls written to a `tool_calls` field; a bad tools file is one line and exit 2."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tool_model_helpers import ANSWER, CALL, QUESTIONS, RESULT, WEATHER, tool_export, tool_run, tools_file

SHOWN = f"[tool call] {CALL['name']} {json.dumps(CALL['arguments'])}"


@pytest.mark.parametrize("content,says", [
    (None, "no such file"),
    ("{not json", "not valid UTF-8 JSON"),
    ('[{"type": "function", "function": {"description": "no name"}}]', "tools[0] must be"),
    ("[]", "holds no function schemas"),
])
@pytest.mark.parametrize("command", [["chat"], ["generate", "--prompt", "hi"]])
def test_bad_tools_file_is_one_line_exit_2(command: list[str], content: str | None, says: str, qlocal_cli: Any,
                                           tmp_path: Path) -> None:
    path = tmp_path / "tools.json"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    # the file is read before any model: the target need not exist
    res = qlocal_cli(command[0], str(tmp_path / "no-model"), *command[1:], "--tools", str(path))
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and says in lines[0] and "write a JSON list" in lines[0], res.stderr
    assert "Traceback" not in res.stderr


def test_tools_on_a_template_without_tool_calls_is_one_line(qlocal_cli: Any, tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp")
    pytest.importorskip("torch")
    from infer_helpers import export_folder, lively_model, synthetic_run

    root = tmp_path.parent
    export = export_folder(root, synthetic_run(root, lively_model(root, "qwen2")))  # plain ChatML template
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([WEATHER]), encoding="utf-8")
    res = qlocal_cli("chat", str(export), "--tools", str(tools), input="hi\n")
    assert res.returncode == 2 and "never renders tool calls" in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    return tmp_path_factory.mktemp("tool_chat")


@pytest.mark.slow
@pytest.mark.parametrize("target", ["gguf", "run"])
def test_chat_shows_the_call_and_answers_the_typed_result(target: str, root: Path, qlocal_cli: Any) -> None:
    if target == "gguf":
        pytest.importorskip("llama_cpp")
    path = tool_export(root) if target == "gguf" else tool_run(root)
    extra = ["--backend", "torch"] if target == "run" else []
    res = qlocal_cli("chat", str(path), "--tools", str(tools_file(root)), "--max-tokens", "64", *extra,
                     input=f"{QUESTIONS[0]}\n{RESULT}\n/reset\n{QUESTIONS[4]}\n")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    # call, the model's answer to the typed result, then the second question's call (its result never comes)
    assert lines[0] == SHOWN and lines[1] == ANSWER and lines[2] == SHOWN, res.stdout
    assert "<tool_call>" not in res.stdout


@pytest.mark.slow
def test_generate_writes_tool_calls(root: Path, qlocal_cli: Any) -> None:
    pytest.importorskip("llama_cpp")
    export = tool_export(root)
    src, out = root / "in.jsonl", root / "out.jsonl"
    rows = [{"prompt": QUESTIONS[5]},  # tools from --tools
            {"messages": [{"role": "user", "content": QUESTIONS[6]}], "tools": [WEATHER]},  # its own
            {"messages": [{"role": "user", "content": QUESTIONS[6]},
                          {"role": "assistant", "content": None, "tool_calls": [
                              {"id": "c1", "type": "function",
                               "function": {"name": "get_weather", "arguments": json.dumps(CALL["arguments"])}}]},
                          {"role": "tool", "tool_call_id": "c1", "content": RESULT}]}]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    res = qlocal_cli("generate", str(export), "--input-file", str(src), "--output", str(out),
                     "--tools", str(tools_file(root)), "--max-tokens", "64")
    assert res.returncode == 0, res.stderr
    got = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    for row in got[:2]:
        assert [c["function"] for c in row["tool_calls"]] == [CALL] and row["response"] == "", row
        assert row["tool_calls"][0]["type"] == "function" and row["tool_calls"][0]["id"]
    assert got[2]["tool_calls"] == [] and got[2]["response"] == ANSWER
    one = qlocal_cli("generate", str(export), "--prompt", QUESTIONS[7], "--tools", str(tools_file(root)),
                     "--max-tokens", "64")
    assert one.returncode == 0 and one.stdout.splitlines() == [SHOWN], one.stdout + one.stderr
