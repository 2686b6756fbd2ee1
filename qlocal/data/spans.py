"""Where each assistant turn sits in a rendered chat: the character spans the loss mask trains.

A turn is what the model must write after the prompt of its own inference: from the end of the
generation prompt to its last end-of-turn token (tool-call text and thinking included). Two
methods, tried in order for each assistant turn i:

  prefix    render(messages[:i], generation prompt) is a prefix of render(messages[:i+1]), itself a
            prefix of the full render: the turn is the text in between. Exact for any prefix-stable
            template, and checks itself.
  sentinel  for templates that are not prefix-stable (Qwen3 drops older reasoning and writes an
            empty <think> for the last turns, Mistral writes the tools before the last user turn,
            Hermes closes the last tool result differently): the content of the message before the
            turn, and of the one after it, is swapped for a sentinel word. The text after the
            first sentinel is that message's closing plus the generation prompt, then the turn; the
            text before the second ends with the next message's opening, and the turn ends after the
            last end-of-turn token before it. A template that writes no generation prompt (Mistral)
            leaves the turn starting right after the previous message's closing.

Framework-free; `render(messages, add_generation_prompt)` is the sample's own render function.
"""

from __future__ import annotations

import re
from typing import Callable

from qlocal.errors import UserError

Render = Callable[[list[dict], bool], str]
SENTINEL = "QlocalSentinelWord"  # letters only: survives trim, tojson and |string unchanged


def _variant(messages: list[dict], j: int, tag: str) -> list[dict]:
    out = list(messages)
    out[j] = {**messages[j], "content": tag}
    return out


def _try(render: Render, messages: list[dict], gen: bool) -> str | None:
    try:
        return render(messages, gen)
    except UserError:
        return None


def _prefix_span(messages: list[dict], i: int, render: Render, full: str, pos: int) -> tuple[int, int] | None:
    if i == 0:
        return None
    prefix, upto = _try(render, messages[:i], True), _try(render, messages[: i + 1], False)
    if prefix and upto and full.startswith(upto) and len(upto) > len(prefix) >= pos and upto.startswith(prefix):
        return len(prefix), len(upto)
    return None


def _header_candidates(messages: list[dict], i: int, render: Render) -> list[str]:
    """What the generation prompt adds after messages[:i] (e.g. "<|im_start|>assistant\\n"), and
    its shorter prefixes ending at a line break (Qwen3's no-thinking prompt adds an empty think
    block that earlier turns of the full render do not have)."""
    with_gen, without = _try(render, messages[:i], True), _try(render, messages[:i], False)
    if not with_gen or without is None or not with_gen.startswith(without) or len(with_gen) == len(without):
        return []
    head = with_gen[len(without):]
    out = [head] + [head[: m.end()] for m in reversed(list(re.finditer(r"\n+", head)))]
    return list(dict.fromkeys(c for c in out if c.strip()))


def _common_prefix(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _start(messages: list[dict], i: int, render: Render, full: str, pos: int) -> int | None:
    for j in range(i - 1, -1, -1):  # the nearest earlier message the template renders where it stands
        if messages[j]["role"] == "assistant":
            return pos  # right after the previous turn's span
        tag = f"{SENTINEL}{j}"
        variant = _variant(messages, j, tag)
        whole, prompt = _try(render, variant, False), _try(render, variant[:i], True)
        if not whole or not prompt or whole.count(tag) != 1 or prompt.count(tag) != 1:
            continue
        tail_full = whole[whole.index(tag) + len(tag):]
        tail_prompt = prompt[prompt.index(tag) + len(tag):]
        base = len(full) - len(tail_full)
        if not full.endswith(tail_full) or base < pos:
            continue
        if tail_full.startswith(tail_prompt):
            return base + len(tail_prompt)
        # This turn's header is the first one after the previous message: the earliest occurrence
        # of any candidate (the longest at that place), not a later turn's fuller one.
        found = [(k, -len(h)) for h in _header_candidates(messages, i, render) if (k := tail_full.find(h)) >= 0]
        if found:
            k, neg = min(found)
            return base + k - neg
        return base + _common_prefix(tail_full, tail_prompt)
    # Nothing before the turn that the template renders in place (an opening assistant turn):
    # the first generation header after `pos`.
    found = [(k, -len(h)) for h in _header_candidates(messages, i, render) if (k := full.find(h, pos)) >= 0]
    if found:
        k, neg = min(found)
        return k - neg
    return None


def _head(messages: list[dict], i: int, render: Render, full: str, start: int) -> int | None:
    """Length of a render of `full` up to the message after turn i: text before the next message's
    sentinel content, else (when the swap changes what comes before it) the render ending at turn i."""
    tag = f"{SENTINEL}{i + 1}"
    whole = _try(render, _variant(messages, i + 1, tag), False)
    if whole and whole.count(tag) == 1:
        head = whole[: whole.index(tag)]
        if full.startswith(head) and len(head) > start:
            return len(head)
    # Templates that compare whole messages (Mistral's `message == user_messages[-1]` places the
    # tools before every user turn equal to the last) render text before the swapped message
    # differently when contents repeat; the render of messages[:i+1] is unaffected by that swap.
    upto = _try(render, messages[: i + 1], False)
    if upto and full.startswith(upto) and len(upto) > start:
        return len(upto)
    return None


def _end(messages: list[dict], i: int, render: Render, full: str, start: int, ends: list[str]) -> int | None:
    if i + 1 >= len(messages):
        return len(full)
    limit = _head(messages, i, render, full, start) if ends else None
    if limit is None:
        return None
    found = list(re.finditer("|".join(map(re.escape, ends)), full[start:limit]))
    if not found:
        return None
    end = start + found[-1].end()
    while end < limit and full[end].isspace():  # the template's line break after the end token, as prefix spans have
        end += 1
    return end


def assistant_spans(messages: list[dict], render: Render, full: str, ends: list[str],
                    locate: Callable[[dict, int], tuple[int, int] | None]) -> list[tuple[int, int] | None]:
    """Character span of every assistant turn of `messages` in `full` (their render), in order;
    None where neither method (nor `locate(message, pos)`, a content search) finds the turn."""
    spans: list[tuple[int, int] | None] = []
    pos = 0
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        span = _prefix_span(messages, i, render, full, pos)
        start = None if span is not None else _start(messages, i, render, full, pos)
        if start is not None:
            end = _end(messages, i, render, full, start, ends)
            span = (start, end) if end is not None and end > start else None
        if span is None and not msg.get("tool_calls"):  # the content at or after the turn's start, never prompt text before it
            span = locate(msg, pos if start is None else start)
        if span is None and start is None:  # last resort: the turn runs from the previous one's end
            end = _end(messages, i, render, full, pos, ends)
            span = (pos, end) if end is not None and end > pos else None
        spans.append(span)
        if span is not None:
            pos = span[1]
    return spans
