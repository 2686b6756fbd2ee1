"""qlocal.tool_calls: what each family's template writes for a call parses back into that call.

Round trips render an assistant turn with calls through the real templates (tests/assets/chat_templates)
and parse the text the model would have to write (after the generation prompt, before the end of
turn) with the tag qlocal reads from the family table; hand-written outputs cover Ollama's rules.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from qlocal.chat_families import FAMILIES
from qlocal.tool_calls import check_call, derive_tag, openai_calls, parse, template_tag
from tool_helpers import TIME, TOOLS, WEATHER, template, tokenizer

# fixture file -> chat-family name whose tool_call_tag (and Ollama TEMPLATE) it is
FAMILY_OF = {"qwen2.5": "qwen2.5", "qwen3": "qwen3", "hermes": "hermes", "llama3.1": "llama3.1", "mistral": "mistral-v3"}
ENDS = ("<|im_end|>", "<|eot_id|>", "</s>")


def _call(name: str, args: dict, n: int) -> dict:
    return {"id": f"call{n:05d}", "type": "function", "function": {"name": name, "arguments": args}}


def _model_text(fixture: str, calls: list[dict], content: str = "") -> str:
    """What the model writes for an assistant turn making `calls`: the render after the generation prompt."""
    tok = tokenizer(fixture)
    user = {"role": "user", "content": "Weather in Paris and the time in Tokyo?"}
    prompt = tok.apply_chat_template([user], tools=TOOLS, tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template([user, {"role": "assistant", "content": content, "tool_calls": calls}],
                                   tools=TOOLS, tokenize=False)
    start = len(os.path.commonprefix([prompt, full]))
    turn = full[start:]
    return turn[:min((turn.find(e) for e in ENDS if e in turn), default=len(turn))]


@pytest.mark.parametrize("fixture", list(FAMILY_OF))
def test_tag_is_the_family_tag_and_what_the_template_writes(fixture: str) -> None:
    tmpl = template(fixture)
    fam = FAMILIES[FAMILY_OF[fixture]]
    assert template_tag(tmpl) == fam.tool_call_tag
    # Ollama's rule (text before the call's "{") applied to the Jinja gives the table's tag too
    assert derive_tag(tmpl) == fam.tool_call_tag


@pytest.mark.parametrize("fixture", list(FAMILY_OF))
def test_single_call_round_trip(fixture: str) -> None:
    calls = [_call("get_weather", {"city": "Paris", "unit": "celsius"}, 1)]
    text = _model_text(fixture, calls)
    out = parse(text, template_tag(template(fixture)), TOOLS, thinking=True)
    assert out.tagged and not out.errors, (text, out)
    assert [c["function"] for c in out.calls] == [c["function"] for c in calls]
    assert out.content.strip() == ""
    assert check_call(out.calls[0], TOOLS, types=True) == []


@pytest.mark.parametrize("fixture", ["qwen2.5", "qwen3", "hermes", "mistral"])
def test_parallel_calls_round_trip(fixture: str) -> None:
    calls = [_call("get_weather", {"city": "Paris"}, 1), _call("get_time", {"timezone": "Asia/Tokyo"}, 2)]
    text = _model_text(fixture, calls)
    out = parse(text, template_tag(template(fixture)), TOOLS, thinking=True)
    assert [c["function"] for c in out.calls] == [c["function"] for c in calls], (text, out)
    assert not out.errors


@pytest.mark.parametrize("fixture", ["qwen2.5", "qwen3"])  # Hermes drops content beside calls
def test_content_before_a_call_is_content(fixture: str) -> None:
    calls = [_call("get_time", {"timezone": "Europe/Paris"}, 1)]
    text = _model_text(fixture, calls, content="Let me check.")
    out = parse(text, "<tool_call>", TOOLS, thinking=True)  # Qwen3 writes an empty <think> block first
    assert out.content.strip() == "Let me check." and len(out.calls) == 1


def test_qwen3_reasoning_then_call() -> None:
    text = "<think>\nThe user wants the weather.\n</think>\n\n<tool_call>\n" \
           '{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    out = parse(text, "<tool_call>", TOOLS, thinking=True)
    assert out.reasoning == "The user wants the weather." and out.content == ""
    assert out.calls[0]["function"] == {"name": "get_weather", "arguments": {"city": "Oslo"}}


def test_brace_tag_only_at_the_start() -> None:
    # Ollama: with "{" as the tag a call is looked for only when the output opens with it
    prose = 'Use JSON like {"name": "get_weather", "parameters": {"city": "Rome"}} to ask.'
    plain = parse(prose, "{", TOOLS)
    assert plain.content == prose and not plain.tagged and plain.calls == []
    out = parse('  {"name": "get_weather", "parameters": {"city": "Rome"}} done', "{", TOOLS)
    assert out.calls[0]["function"]["arguments"] == {"city": "Rome"} and out.content.strip() == "done"
    # Llama 3.x style parallel calls: objects one after another, or an array
    two = '{"name": "get_weather", "parameters": {"city": "A"}}; {"name": "get_time", "parameters": {"timezone": "B"}}'
    assert [c["function"]["name"] for c in parse(two, "{", TOOLS).calls] == ["get_weather", "get_time"]
    arr = '[{"name": "get_weather", "arguments": {"city": "A"}}, {"name": "get_time", "arguments": {"timezone": "B"}}]'
    assert [c["function"]["name"] for c in parse(arr, "[", TOOLS).calls] == ["get_weather", "get_time"]


def test_argument_spellings() -> None:
    as_string = '<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"Lima\\"}"}\n</tool_call>'
    assert parse(as_string, "<tool_call>").calls[0]["function"]["arguments"] == {"city": "Lima"}
    openai_shape = '<tool_call>{"type": "function", "function": {"name": "get_time", "arguments": {"timezone": "UTC"}}}'
    assert parse(openai_shape, "<tool_call>").calls[0]["function"]["name"] == "get_time"
    keyed = '<tool_call>{"get_time": {"timezone": "UTC"}}</tool_call>'
    assert parse(keyed, "<tool_call>", TOOLS).calls[0]["function"] == {"name": "get_time", "arguments": {"timezone": "UTC"}}
    assert parse(keyed, "<tool_call>").calls == []  # only a declared tool's name can be a key
    no_args = parse('<tool_call>{"name": "get_time"}</tool_call>', "<tool_call>")
    assert no_args.calls[0]["function"]["arguments"] == {}


def test_broken_calls_are_errors_not_calls() -> None:
    broken = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}\n</tool_call>'
    bad = parse(broken, "<tool_call>")
    assert bad.tagged and bad.calls == [] and "invalid JSON" in bad.errors[0] and bad.content == ""  # as Ollama
    shown = parse("Sure. " + broken, "<tool_call>", keep_broken=True)
    assert shown.content == "Sure. " + broken and shown.errors == bad.errors
    # a broken call does not hide the next good one
    two = '<tool_call>{"name": "x", </tool_call>\n<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    out = parse(two, "<tool_call>")
    assert [c["function"]["name"] for c in out.calls] == ["get_time"] and len(out.errors) == 1, out
    assert parse("<tool_call>\nsorry</tool_call>", "<tool_call>").errors == ["no JSON call after '<tool_call>'"]
    assert parse('<tool_call>{"name": "f", "arguments": [1]}', "<tool_call>").errors == \
        ["f: arguments must be a JSON object, got list"]
    plain = parse("It is sunny.", "<tool_call>", TOOLS)
    assert plain.content == "It is sunny." and not plain.tagged and plain.calls == []
    assert parse("<tool_call>{}", None).content == "<tool_call>{}"  # no tag: no calls looked for


def test_partial_tag_is_not_a_call() -> None:
    assert not parse("Checking <tool_ca", "<tool_call>").tagged


def test_check_call_against_schemas() -> None:
    def call(name: str, args: object) -> dict:
        return {"type": "function", "function": {"name": name, "arguments": args}}

    assert check_call(call("get_weather", {"city": "Paris"}), TOOLS) == []
    assert "not a declared tool" in check_call(call("get_news", {}), TOOLS)[0]
    assert check_call(call("get_weather", {"unit": "celsius"}), TOOLS) == ["get_weather: missing required argument 'city'"]
    assert check_call(call("get_weather", '{"city": "Paris"}'), TOOLS) == []  # OpenAI's string arguments
    assert "not valid JSON" in check_call(call("get_weather", '{"city": '), TOOLS)[0]
    wrong = call("get_weather", {"city": 3, "unit": "kelvin"})
    assert check_call(wrong, TOOLS) == []  # types are only checked when asked
    assert len(check_call(wrong, TOOLS, types=True)) == 2
    assert check_call(call("get_time", {"timezone": "UTC"}), [WEATHER]) != []
    assert check_call(call("get_time", {"timezone": "UTC"}), [TIME]) == []


def test_openai_shape() -> None:
    out = openai_calls(parse('<tool_call>{"name": "get_weather", "arguments": {"city": "Zürich"}}', "<tool_call>").calls)
    assert out[0]["type"] == "function" and len(out[0]["id"]) == 9 and out[0]["id"].isalnum()
    assert json.loads(out[0]["function"]["arguments"]) == {"city": "Zürich"}
    assert out[0]["function"]["name"] == "get_weather"


def test_templates_without_tool_calls_have_no_tag() -> None:
    assert template_tag(template("gemma3")) is None
    assert template_tag(FAMILIES["chatml"].jinja) is None
    assert template_tag(None) is None
