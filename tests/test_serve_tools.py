"""`qlocal serve` with tools: the official openai client gets OpenAI tool_calls, streaming and not,
from a GGUF whose model was fine-tuned to call a tool (tests/tool_model_helpers.py). The request
checks and the stream parser are tested without a model."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator

import pytest

from qlocal.serve_tools import RequestError, check_request, wants_tools
from qlocal.tool_calls import StreamParser, parse
from tool_model_helpers import ANSWER, CALL, QUESTIONS, RESULT, WEATHER


# ----------------------------------------------------------------------------------------------
# Without a model


OUTPUTS = [
    ("<tool_call>", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'),
    ("<tool_call>", 'Let me look.\n<tool_call>{"name": "a", "arguments": {}}</tool_call>\n<tool_call>{"name": "b", "arguments": {"x": [1, {"y": "}"}]}}</tool_call>'),
    ("<tool_call>", "No call here, only <tool text."),
    ("<tool_call>", "Ends on a partial tag <tool_ca"),
    ("<tool_call>", 'Broken: <tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>'),
    ("{", '  {"name": "get_weather", "parameters": {"city": "Rome"}}'),
    ("{", 'Prose {"name": "get_weather", "parameters": {}}'),
    ("[TOOL_CALLS][", '[TOOL_CALLS][{"name": "a", "arguments": {}, "id": "abcdefghi"}, {"name": "b", "arguments": {"k": 1}}]'),
    (None, "plain text <tool_call>"),
]


def _pieces(text: str, size: int) -> Iterator[str]:
    for i in range(0, len(text), size):
        yield text[i:i + size]


@pytest.mark.parametrize("keep_broken", [False, True])
@pytest.mark.parametrize("size", [1, 3, 7, 1000])
@pytest.mark.parametrize("tag,text", OUTPUTS)
def test_stream_parser_hands_out_what_parse_finds(tag: str | None, text: str, size: int, keep_broken: bool) -> None:
    want = parse(text, tag, keep_broken=keep_broken)
    parser = StreamParser(tag, keep_broken=keep_broken)
    content, calls = "", []
    for piece in _pieces(text, size):
        c, done = parser.feed(piece)
        content += c
        calls += done
        # content never shows call text, nor the start of a tag that may still come
        assert not (want.tagged and tag in content), content
    c, done = parser.finish()
    assert (content + c, calls + done) == (want.content, want.calls)


def test_stream_parser_emits_a_call_as_soon_as_its_json_closes() -> None:
    parser = StreamParser("<tool_call>")
    text = '<tool_call>{"name": "a", "arguments": {}}</tool_call><tool_call>{"name": "b", "arguments": {}}'
    close = text.index("}}") + 2
    assert parser.feed(text[:close - 1]) == ("", [])
    assert [c["function"]["name"] for c in parser.feed(text[close - 1:close])[1]] == ["a"]
    assert [c["function"]["name"] for c in parser.feed(text[close:])[1]] == ["b"]


def test_request_checks() -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER]}
    assert wants_tools(body) and not wants_tools({"messages": [{"role": "user", "content": "hi"}]})
    req = check_request(body)
    assert req.tools == [WEATHER] and req.parse_calls and not req.force
    assert check_request({**body, "tool_choice": "required"}).force
    none = check_request({**body, "tool_choice": "none"})
    assert none.tools is None and not none.parse_calls
    named = check_request({**body, "tools": [WEATHER, {"type": "function", "function": {"name": "other"}}],
                           "tool_choice": {"type": "function", "function": {"name": "get_weather"}}})
    assert named.tools == [WEATHER] and named.force
    # the history as the openai client sends it back: arguments a JSON string, content null
    hist = check_request({**body, "messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": RESULT}]}]})
    assert hist.messages[1]["content"] == "" and hist.messages[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert hist.messages[2]["content"] == RESULT
    for bad, says in [({**body, "tools": [{"type": "function", "function": {}}]}, "tools[0]"),
                      ({**body, "tools": {"name": "x"}}, "list"),
                      ({**body, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "'nope'"),
                      ({**body, "tool_choice": "sometimes"}, "tool_choice"),
                      ({"messages": body["messages"], "tool_choice": "required"}, "no 'tools'"),
                      ({**body, "messages": [{"role": "assistant", "tool_calls": [
                          {"function": {"name": "f", "arguments": "{bad"}}]}]}, "not valid JSON"),
                      ({**body, "messages": []}, "messages")]:
        with pytest.raises(RequestError, match=re.escape(says)):
            check_request(bad)


# ----------------------------------------------------------------------------------------------
# A served GGUF that calls tools


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    pytest.importorskip("llama_cpp")
    pytest.importorskip("uvicorn", reason="needs llama-cpp-python[server] (qlocal[gguf])")
    pytest.importorskip("torch")
    pytest.importorskip("openai", reason="the official client is in qlocal[dev]")
    from infer_helpers import served
    from tool_model_helpers import tool_export

    root = tmp_path_factory.mktemp("serve_tools")
    with served(tool_export(root), root / "serve.log", "--name", "weather") as base:
        yield base


def _client(base: str):  # type: ignore[no-untyped-def]
    from openai import OpenAI

    return OpenAI(base_url=base, api_key="unused", max_retries=0)


def _ask(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


@pytest.mark.slow
def test_openai_client_gets_tool_calls(server: str) -> None:
    out = _client(server).chat.completions.create(model="weather", messages=_ask(QUESTIONS[0]), tools=[WEATHER],
                                                  temperature=0, max_tokens=64)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == CALL["name"]
    assert json.loads(call.function.arguments) == CALL["arguments"]
    assert call.id and not choice.message.content
    assert out.usage.completion_tokens > 5


@pytest.mark.slow
def test_openai_client_streams_tool_calls(server: str) -> None:
    stream = _client(server).chat.completions.create(model="weather", messages=_ask(QUESTIONS[1]), tools=[WEATHER],
                                                     temperature=0, max_tokens=64, stream=True)
    calls: dict[int, dict] = {}
    content, finish = "", None
    for chunk in stream:
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for tc in delta.tool_calls or []:  # accumulated the way OpenAI's own docs do it
            entry = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            entry["id"] = tc.id or entry["id"]
            entry["name"] += (tc.function.name or "") if tc.function else ""
            entry["arguments"] += (tc.function.arguments or "") if tc.function else ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and content.strip() == ""
    assert list(calls) == [0] and calls[0]["id"] and calls[0]["name"] == CALL["name"]
    assert json.loads(calls[0]["arguments"]) == CALL["arguments"]


@pytest.mark.slow
def test_tool_result_round_trip_and_tool_choice(server: str) -> None:
    client = _client(server)
    first = client.chat.completions.create(model="weather", messages=_ask(QUESTIONS[2]), tools=[WEATHER],
                                           temperature=0, max_tokens=64)
    call = first.choices[0].message.tool_calls[0]
    # the assistant turn goes back as the client sends it (arguments a JSON string, content null)
    history = _ask(QUESTIONS[2]) + [first.choices[0].message.model_dump(exclude_none=True),
                                    {"role": "tool", "tool_call_id": call.id, "content": RESULT}]
    answer = client.chat.completions.create(model="weather", messages=history, tools=[WEATHER], temperature=0,
                                            max_tokens=32)
    assert answer.choices[0].message.content.strip() == ANSWER
    assert answer.choices[0].finish_reason == "stop" and not answer.choices[0].message.tool_calls
    # tool_choice "none": the tools stay out of the prompt and nothing is parsed as a call
    none = client.chat.completions.create(model="weather", messages=_ask(QUESTIONS[0]), tools=[WEATHER],
                                          tool_choice="none", temperature=0, max_tokens=16)
    assert none.choices[0].message.tool_calls is None and none.choices[0].finish_reason in ("stop", "length")
    # a named function: the call tag is written for the model, which goes on with the call
    named = client.chat.completions.create(model="weather", messages=_ask(QUESTIONS[3]), tools=[WEATHER],
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                           temperature=0, max_tokens=64)
    assert named.choices[0].message.tool_calls[0].function.name == "get_weather"
    required = client.chat.completions.create(model="weather", messages=_ask(QUESTIONS[5]), tools=[WEATHER],
                                              tool_choice="required", temperature=0, max_tokens=64)
    assert required.choices[0].finish_reason == "tool_calls"
    assert json.loads(required.choices[0].message.tool_calls[0].function.arguments) == CALL["arguments"]
    # without tools the request is llama-cpp-python's, as before
    plain = client.chat.completions.create(model="weather", messages=_ask("Hello"), temperature=0, max_tokens=8)
    assert plain.choices[0].message.tool_calls is None


@pytest.mark.slow
def test_bad_tool_requests_are_400(server: str) -> None:
    import openai

    client = _client(server)
    with pytest.raises(openai.BadRequestError, match="tools\\[0\\]"):
        client.chat.completions.create(model="weather", messages=_ask("hi"),
                                       tools=[{"type": "function", "function": {"description": "no name"}}])
    with pytest.raises(openai.BadRequestError, match="not in 'tools'"):
        client.chat.completions.create(model="weather", messages=_ask("hi"), tools=[WEATHER],
                                       tool_choice={"type": "function", "function": {"name": "get_time"}})


def test_a_schema_without_description_renders_with_a_hermes_template() -> None:
    """serve's tools path normalises schemas as the data path does: the Hermes template reads
    `description`, so a request naming only the function renders instead of answering 400."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    hermes = (Path(__file__).resolve().parent.parent / "configs" / "hermes_tools.jinja").read_text(encoding="utf-8")
    req = check_request({"messages": [{"role": "user", "content": "Ping?"}],
                         "tools": [{"type": "function", "function": {"name": "ping"}}]})
    assert req.tools == [{"type": "function", "function": {
        "name": "ping", "description": "", "parameters": {"type": "object", "properties": {}}}}]
    prompt = Jinja2ChatFormatter(hermes, eos_token="<|im_end|>", bos_token="")(messages=req.messages, tools=req.tools).prompt
    assert "ping" in prompt and prompt.rstrip().endswith("<|im_start|>assistant")
