"""Sample -> Example(input_ids, loss_mask): the one token contract both backends consume.

loss_mask[t] == 1 means token t is a training target (predicted from tokens < t). Every backend
computes mean next-token cross-entropy over targets: logits[t] predict input_ids[t+1], weighted by
loss_mask[t+1]. By default only assistant turns (content, tool-call text, thinking and end-of-turn
tokens) are targets; tool schemas, system, user turns and tool results are not (data.spans says
how a turn is found). Tools and reasoning go to the template as data (`tools=`, the message keys of
qlocal.data.tools, its thinking switch such as Qwen3's `enable_thinking`).

Framework-free: the tokenizer is a Hugging Face tokenizer passed in; nothing imports torch or mlx.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from qlocal.chat_families import detect, end_of_turn_tokens
from qlocal.data.formats import Sample
from qlocal.data.spans import assistant_spans
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


def _apply(tokenizer: Any, messages: list[dict[str, Any]], template: str, gen: bool, where: str,
           extra: dict[str, Any] | None = None) -> str:
    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=gen, **(extra or {}))
    except Exception as e:  # jinja raise_exception, undefined keys, ...
        raise UserError(f"{where}: the chat template cannot render this conversation ({e}); "
                        "fix the record, pass --skip-bad-lines, or choose another --chat-template") from None


def chat_inputs(sample: Sample, template: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The messages and template variables for rendering `sample` with `template`.

    Reasoning goes where the template reads it: `reasoning_content` (Qwen3, DeepSeek), a message's
    `thinking` (gpt-oss), else inline as <think>...</think> before the answer (the family's tags
    when the table names them): a template with no thinking of its own would drop it. Tool data on a
    template that never renders tools is an error rather than silently lost.
    """
    messages = sample.messages
    calls = any(m.get("tool_calls") for m in messages)
    if (sample.tools and not re.search(r"\btools\b", template)) or (calls and "tool_calls" not in template):
        what = "tool calls" if calls else "tool schemas"
        raise UserError(f"{sample.where}: the record has {what} but the chat template never renders them "
                        "(Gemma and the plain fallbacks have no tool format); choose a tool-capable template with "
                        "--chat-template FILE.jinja (e.g. a Hermes-style ChatML one, see configs/tools_sample.yaml)")
    extra: dict[str, Any] = {"tools": sample.tools} if sample.tools else {}
    thinks = any(m.get("reasoning_content") for m in messages)
    if "enable_thinking" in template:  # the template's switch: on for data that thinks, off otherwise
        extra["enable_thinking"] = thinks
    if not thinks or "reasoning_content" in template:
        return messages, extra
    if re.search(r"""\.thinking\b|\[['"]thinking['"]\]""", template):
        return [_rekey(m, "thinking") for m in messages], extra
    fam = detect(template)
    open_tag, close_tag = (fam.thinking_tags if fam and fam.thinking_tags else ("<think>", "</think>"))
    inline = []
    for m in messages:
        if m.get("reasoning_content"):
            think = f"{open_tag}\n{m['reasoning_content']}\n{close_tag}\n\n"
            m = {**{k: v for k, v in m.items() if k != "reasoning_content"}, "content": think + m["content"]}
        inline.append(m)
    return inline, extra


def conversation_inputs(messages: list[dict[str, Any]], tools: list[dict] | None, template: str,
                        where: str = "the conversation", thinking: bool | None = None
                        ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """`chat_inputs` for a conversation to answer (OpenAI messages and schemas from chat, generate
    or a server request), read first as training reads a messages record: call arguments as objects
    in Ollama's key order, schema properties sorted, call ids and result names filled in, <think>
    blocks as reasoning. So inference renders the prompt training rendered before that turn.

    `thinking` sets a template's thinking switch (`enable_thinking`) the way the run's data set it
    (a run trained without reasoning renders its empty thinking block as prompt); None: from these
    messages, as for a training record.
    """
    from qlocal.data.formats import parse_turns
    from qlocal.data.tools import parse_tools

    sample = Sample("chat", messages=parse_turns({"messages": messages}, "messages", where), where=where,
                    tools=parse_tools(tools, where))
    msgs, extra = chat_inputs(sample, template)
    if thinking is not None and "enable_thinking" in extra:
        extra["enable_thinking"] = thinking
    return msgs, extra


def _rekey(message: dict[str, Any], key: str) -> dict[str, Any]:
    if "reasoning_content" not in message:
        return message
    out = {k: v for k, v in message.items() if k != "reasoning_content"}
    out[key] = message["reasoning_content"]
    return out


def _end_tokens(tokenizer: Any) -> list[str]:
    """Special tokens that can close a turn: eos, the chat-family table's end-of-turn tokens, and
    any other special token that looks like an end (for model templates outside the table)."""
    specials = set(tokenizer.all_special_tokens) | {str(t) for t in tokenizer.added_tokens_decoder.values()
                                                    if getattr(t, "special", False)}
    known = set(end_of_turn_tokens())
    ends = {t for t in specials if t in known or (
        re.search(r"end|eot|eom|eos|</s>", t, re.I) and not re.search(r"header|start|begin", t, re.I))}
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


def _assistant_spans(sample: Sample, messages: list[dict[str, Any]], tokenizer: Any, template: str, full: str,
                     extra: dict[str, Any], train_on_reasoning: bool) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Character spans of every assistant turn in the rendered string (see data.spans), and the
    spans to leave untrained inside them: each turn's reasoning text without train_on_reasoning
    (its tags stay trained, so the model still opens and closes its thinking)."""
    ends = _end_tokens(tokenizer)
    found = assistant_spans(messages, lambda msgs, gen: _apply(tokenizer, msgs, template, gen, sample.where, extra),
                            full, ends, lambda msg, pos: _locate(full, msg["content"], pos, ends))
    turns = [m for m in sample.messages if m["role"] == "assistant"]
    spans: list[tuple[int, int]] = []
    cut: list[tuple[int, int]] = []
    for n, (span, msg) in enumerate(zip(found, turns)):
        if span is None:
            raise UserError(f"{sample.where}: cannot find assistant turn {n + 1} in the rendered chat template "
                            "(the template drops or rewrites it); choose another --chat-template or pass --skip-bad-lines")
        reasoning = (msg.get("reasoning_content") or "").strip()
        at = full.find(reasoning, *span) if reasoning and not train_on_reasoning else -1
        if at >= 0:
            cut.append((at, at + len(reasoning)))
        spans.append(span)
    return spans, cut


def _overlaps(s: int, e: int, spans: list[tuple[int, int]]) -> bool:
    return any((s < b and e > a) or (s == e and a <= s < b) for a, b in spans)


def _tokens_in_spans(offsets: list[tuple[int, int]], spans: list[tuple[int, int]],
                     cut: list[tuple[int, int]] | None = None) -> list[int]:
    # A token that straddles a span edge is trained: it carries assistant text; one that touches
    # a cut span (untrained reasoning) is not: it carries reasoning.
    return [int(_overlaps(s, e, spans) and not (cut and _overlaps(s, e, cut))) for s, e in offsets]


def render(sample: Sample, tokenizer: Any, template: str, train_on_prompt: bool = False,
           max_seq_len: int | None = None, train_on_reasoning: bool = True) -> Example:
    """Render a Sample through the chat template and tokenise it into an Example.

    chat: assistant turns (text, tool calls, thinking unless not train_on_reasoning) + their
    end-of-turn tokens are targets (all but a leading bos with train_on_prompt). text: bos (if the
    tokenizer adds one) + text + eos, all targets but bos. Longer than max_seq_len -> cut to
    max_seq_len with truncated=True.
    """
    bos = tokenizer.bos_token_id if adds_bos(tokenizer) else None
    if sample.kind == "text":
        ids = list(tokenizer(sample.text, add_special_tokens=False)["input_ids"])
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        mask = [1] * len(ids)
    else:
        messages, extra = chat_inputs(sample, template)
        full = _apply(tokenizer, messages, template, False, sample.where, extra)
        # Templates carry their own bos, so the tokenizer must not add another.
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        mask = [1] * len(ids) if train_on_prompt else _tokens_in_spans(
            [tuple(o) for o in enc["offset_mapping"]],
            *_assistant_spans(sample, messages, tokenizer, template, full, extra, train_on_reasoning))
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


# For callers that cut a render into parts (qlocal.data.preference: prompt | response).

def apply_template(tokenizer: Any, messages: list[dict[str, Any]], template: str, add_generation_prompt: bool,
                   where: str, extra: dict[str, Any] | None = None) -> str:
    """The chat template's text for `messages` (template variables in `extra`); errors name `where`."""
    return _apply(tokenizer, messages, template, add_generation_prompt, where, extra)


def generation_ids(tokenizer: Any, messages: list[dict[str, Any]], template: str,
                   extra: dict[str, Any] | None = None) -> list[int]:
    """Token ids of `messages` + the assistant header, tokenised as `render` tokenises examples: the
    template's own specials only, and bos in front when the tokenizer adds one and the template does not."""
    text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True,
                                         **(extra or {}))
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if adds_bos(tokenizer) and (not ids or ids[0] != tokenizer.bos_token_id):
        ids = [tokenizer.bos_token_id] + ids
    return ids


def generation_text(messages: list[dict[str, Any]], template: str, extra: dict[str, Any],
                    special_tokens: dict[str, str]) -> str:
    """The text `generation_ids` tokenises, for a model without an HF tokenizer (a GGUF):
    transformers' own Jinja renderer, called as apply_chat_template calls it, with `special_tokens`
    (bos_token, eos_token) standing in for the tokenizer's special-tokens map."""
    from transformers.utils.chat_template_utils import render_jinja_template

    kw = {**special_tokens, **extra}
    tools = kw.pop("tools", None)
    out, _ = render_jinja_template(conversations=[messages], tools=tools, chat_template=template,
                                   add_generation_prompt=True, **kw)
    return out[0]


def chat_spans(sample: Sample, tokenizer: Any, template: str,
               train_on_reasoning: bool = True) -> tuple[str, list[tuple[int, int]], list[tuple[int, int]]]:
    """The full render of a chat sample, the character span of each assistant turn (in order) and
    the reasoning spans cut out of them: what `render` trains, before tokenising."""
    messages, extra = chat_inputs(sample, template)
    full = _apply(tokenizer, messages, template, False, sample.where, extra)
    return (full, *_assistant_spans(sample, messages, tokenizer, template, full, extra, train_on_reasoning))


def span_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]],
              cut: list[tuple[int, int]] | None = None) -> list[int]:
    """1 for each token (character offsets) inside a span and outside every cut span, as `render` masks."""
    return _tokens_in_spans(offsets, spans, cut)


def mask_runs(example: Example) -> list[tuple[int, list[int]]]:
    """The example's tokens as (mask, token ids) runs of equal mask, in order."""
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
    for on, ids in mask_runs(example):
        text = tokenizer.decode(ids, skip_special_tokens=False)
        parts.append(f"{OPEN}{text}{CLOSE}" if on else text)
    out = "".join(parts)
    return out + ("\n... (truncated at max_seq_len)" if example.truncated else "")
