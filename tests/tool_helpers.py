"""Tool-calling test fixtures: the real families' templates (tests/assets/chat_templates) on the tiny
tokenizers, with the tokens those families add to their vocabularies, and tool conversations."""

from __future__ import annotations

import copy
from functools import lru_cache
from pathlib import Path
from typing import Any

ASSETS = Path(__file__).resolve().parent / "assets"
TEMPLATES = ASSETS / "chat_templates"

# family -> (tiny tokenizer with the same special-token style, the tokens the real vocabulary adds,
# whether they are special). Qwen keeps its tool/think tags as plain added tokens, Llama and
# Mistral their control tokens as special ones.
_QWEN_TAGS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"]
FAMILIES: dict[str, tuple[str, list[str], bool]] = {
    "qwen2.5": ("qwen2", _QWEN_TAGS, False),
    "qwen3": ("qwen2", _QWEN_TAGS, False),
    "hermes": ("qwen2", _QWEN_TAGS, False),
    "llama3.1": ("llama3", ["<|eom_id|>", "<|python_tag|>"], True),
    "mistral": ("llama3", ["[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_CALLS]",
                           "[TOOL_RESULTS]", "[/TOOL_RESULTS]"], True),
    "gemma3": ("gemma3", [], True),
}
TOOL_FAMILIES = [f for f in FAMILIES if f != "gemma3"]


def template(family: str) -> str:
    """The family's own chat template source."""
    return (TEMPLATES / f"{family}.jinja").read_text(encoding="utf-8")


@lru_cache(maxsize=None)
def _tokenizer(family: str) -> Any:
    from transformers import AutoTokenizer

    base, tokens, special = FAMILIES[family]
    tok = AutoTokenizer.from_pretrained(str(ASSETS / "tokenizers" / base))
    if tokens:
        if special:
            tok.add_special_tokens({"additional_special_tokens": tokens}, replace_extra_special_tokens=False)
        else:
            tok.add_tokens(tokens)
    tok.chat_template = template(family)
    return tok


def tokenizer(family: str) -> Any:
    """A fresh copy of the family's test tokenizer (its chat template set to the family's own)."""
    return copy.deepcopy(_tokenizer(family))


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "City name"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "description": "Temperature unit"}},
        "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Local time in a time zone.",
    "parameters": {"type": "object", "properties": {
        "timezone": {"type": "string", "description": "IANA time zone, e.g. Europe/Paris"}},
        "required": ["timezone"]}}}
TOOLS = [WEATHER, TIME]
