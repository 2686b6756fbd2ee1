"""Sample -> Example(input_ids, loss_mask): the one token contract both backends consume.

loss_mask[t] == 1 means token t is a training target (predicted from tokens < t). Every backend
computes mean next-token cross-entropy over targets: logits[t] predict input_ids[t+1], weighted by
loss_mask[t+1]. By default only assistant turns (content + end-of-turn tokens) are targets.

Framework-free: the tokenizer is a Hugging Face tokenizer passed in; nothing imports torch or mlx.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from qlocal.chat_families import end_of_turn_tokens
from qlocal.data.formats import Sample
from qlocal.errors import UserError

# Markers render_for_display puts around trained spans; plain ASCII so they survive logs and files.
OPEN, CLOSE = "[[", "]]"


@dataclass
class Example:
    """Token ids and the mask of which tokens are training targets (same length)."""

    input_ids: list[int]
    loss_mask: list[int]
    truncated: bool = False


def adds_bos(tokenizer: Any) -> bool:
    """True when the tokenizer puts a bos token in front of plain text by itself (Llama, Gemma)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(with_special) and with_special[0] == bos


def _apply(tokenizer: Any, messages: list[dict[str, str]], template: str, gen: bool, where: str) -> str:
    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=gen)
    except Exception as e:  # jinja raise_exception, undefined keys, ...
        raise UserError(f"{where}: the chat template cannot render this conversation ({e}); "
                        "fix the record, pass --skip-bad-lines, or choose another --chat-template") from None


def _end_tokens(tokenizer: Any) -> list[str]:
    """Special tokens that can close a turn: eos, the chat-family table's end-of-turn tokens, and
    any other special token that looks like an end (for model templates outside the table)."""
    specials = set(tokenizer.all_special_tokens) | {str(t) for t in tokenizer.added_tokens_decoder.values()
                                                    if getattr(t, "special", False)}
    known = set(end_of_turn_tokens())
    ends = {t for t in specials if t in known or (
        re.search(r"end|eot|eos|</s>", t, re.I) and not re.search(r"header|start|begin", t, re.I))}
    if tokenizer.eos_token:
        ends.add(tokenizer.eos_token)
    return sorted(ends, key=len, reverse=True)


def _locate(full: str, content: str, pos: int, ends: list[str]) -> tuple[int, int] | None:
    """Fallback for templates that are not prefix-stable: find the content after `pos`, then
    extend the span over the end-of-turn token that follows it."""
    needle = content.strip()  # many templates trim contents
    if not needle:
        return None
    start = full.find(needle, pos)
    if start < 0:
        return None
    end = start + len(needle)
    if ends:
        m = re.match(r"\s*(?:" + "|".join(map(re.escape, ends)) + ")", full[end:])
        if m:
            end += m.end()
    return start, end


def _assistant_spans(sample: Sample, tokenizer: Any, template: str, full: str) -> list[tuple[int, int]]:
    """Character spans of every assistant turn (content + end-of-turn) in the rendered string."""
    msgs = sample.messages
    spans: list[tuple[int, int]] = []
    pos = 0
    ends: list[str] | None = None
    for i, msg in enumerate(msgs):
        if msg["role"] != "assistant":
            continue
        span = None
        if i > 0:
            # Prefix method: what the template adds for this turn beyond "prompt + generation
            # header" is exactly the assistant's part, for any prefix-stable template.
            try:
                prefix = _apply(tokenizer, msgs[:i], template, True, sample.where)
                upto = _apply(tokenizer, msgs[: i + 1], template, False, sample.where)
            except UserError:
                prefix = upto = ""
            if prefix and full.startswith(upto) and len(upto) > len(prefix) >= pos and upto.startswith(prefix):
                span = (len(prefix), len(upto))
        if span is None:
            if ends is None:
                ends = _end_tokens(tokenizer)
            span = _locate(full, msg["content"], pos, ends)
        if span is None:
            raise UserError(f"{sample.where}: cannot find assistant turn {i} in the rendered chat template "
                            "(the template drops or rewrites it); choose another --chat-template or pass --skip-bad-lines")
        spans.append(span)
        pos = span[1]
    return spans


def _tokens_in_spans(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    mask = [0] * len(offsets)
    for t, (s, e) in enumerate(offsets):
        for a, b in spans:
            # A token that straddles a span edge is trained: it carries assistant text.
            if (s < b and e > a) or (s == e and a <= s < b):
                mask[t] = 1
                break
    return mask


def render(sample: Sample, tokenizer: Any, template: str, train_on_prompt: bool = False,
           max_seq_len: int | None = None) -> Example:
    """Render a Sample through the chat template and tokenise it into an Example.

    chat: assistant contents + their end-of-turn tokens are targets (all but a leading bos with
    train_on_prompt). text: bos (if the tokenizer adds one) + text + eos, all targets but bos.
    Longer than max_seq_len -> cut to max_seq_len with truncated=True.
    """
    bos = tokenizer.bos_token_id if adds_bos(tokenizer) else None
    if sample.kind == "text":
        ids = list(tokenizer(sample.text, add_special_tokens=False)["input_ids"])
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        mask = [1] * len(ids)
    else:
        full = _apply(tokenizer, sample.messages, template, False, sample.where)
        # Templates carry their own bos, so the tokenizer must not add another.
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        mask = [1] * len(ids) if train_on_prompt else _tokens_in_spans(
            [tuple(o) for o in enc["offset_mapping"]], _assistant_spans(sample, tokenizer, template, full))
    if bos is not None and (not ids or ids[0] != bos):
        # A template without bos on a model trained with one (e.g. chatml on Llama): add it, as
        # inference through llama.cpp would.
        ids, mask = [bos] + ids, [0] + mask
    if bos is not None:
        mask[0] = 0
    truncated = max_seq_len is not None and len(ids) > max_seq_len
    if truncated:
        ids, mask = ids[:max_seq_len], mask[:max_seq_len]
    return Example(ids, mask, truncated)


def _runs(example: Example) -> list[tuple[int, list[int]]]:
    runs: list[tuple[int, list[int]]] = []
    for tok, m in zip(example.input_ids, example.loss_mask):
        if runs and runs[-1][0] == m:
            runs[-1][1].append(tok)
        else:
            runs.append((m, [tok]))
    return runs


def render_for_display(example: Example, tokenizer: Any) -> str:
    """The decoded example with every trained span wrapped in [[ ... ]] (special tokens shown)."""
    parts = []
    for on, ids in _runs(example):
        text = tokenizer.decode(ids, skip_special_tokens=False)
        parts.append(f"{OPEN}{text}{CLOSE}" if on else text)
    out = "".join(parts)
    return out + ("\n... (truncated at max_seq_len)" if example.truncated else "")
