"""Preference data, rendered: the examples DPO/IPO/ORPO/SimPO (pairs) and KTO (labelled answers)
train on, and the padded batches their objectives read.

Samples (normalised records; qlocal.data.pref_formats builds them from files):
  PairSample(prompt, chosen, rejected)   message lists in data.formats' internal chat form: the
                                         prompt (system, user, earlier turns; it ends where the
                                         answer starts) and each side's answer (assistant turns)
  KTOSample(prompt, completion, label)   one answer; label True = desirable

Rendering (render_pair, render_kto). The prompt is the chat template's render of the prompt
messages with the generation prompt; a side is the render of prompt + answer. For a prefix-stable
template the prompt's tokens are a prefix of each side's tokens, and both sides share them
exactly (`prompt_ids`). Where they are not (a template that renders the last turn differently, a
token merging across the boundary), the side's answer is the text of its render after the prompt
(or from its first answer turn), tokenised on its own and appended to the prompt's tokens: the
sequence the model sees at inference, the prompt then its own tokens. Such sides are counted
(`split_render`). An answer's tokens run from the end of the prompt to its last end-of-turn
token (what follows, such as ChatML's newline, predicts nothing and is left out); its mask is the
SFT mask there (data.render: assistant text, tool calls, thinking unless data.train_on_reasoning
is off, end-of-turn tokens; a tool result inside a multi-turn answer is not scored).

Truncation (max_seq_len counts one row: prompt + one side). The prompt gives way first, keeping
its end (the generation header) and a leading bos, but not below half the budget; then each
answer is cut to what is left, keeping its start. `truncated` says it happened.

Batches (numpy, int64 unless said, right-padded). Every row is an ordinary sequence, so a backend
computes target log-probs exactly as for SFT, and `(logp * mask).sum(-1)` is a row's sequence
log-prob over its answer (mask = loss_mask shifted, as in qlocal.objectives):
  collate_pairs   2n rows: row i = prompt_i + chosen_i, row n + i = prompt_i + rejected_i
                  input_ids, loss_mask (1 on scored answer tokens), attention_mask   (2n, T)
                  chosen     (2n,) 1 on the chosen rows, 0 on the rejected
                  ref_logp   (2n,) float32 reference sequence log-probs, only when every pair
                             carries them (train.precompute_ref)
  collate_kto     n rows prompt_i + completion_i, then (after assign_kl) n rows
                  prompt_i + kl_completion_i: another example's answer, for KTO's KL estimate
                  input_ids, loss_mask, attention_mask                             (n or 2n, T)
                  label      1 desirable, 0 undesirable (a KL row repeats its prompt's label)
                  kl         1 on the KL rows
                  ref_logp   float32, when every example carries them (KL rows: ref_kl)
Every key that is not a token field reaches `Objective.loss` in `rows`. Framework-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from qlocal.data.batching import collate
from qlocal.data.formats import Sample
from qlocal.data.render import Example, adds_bos, apply_template, chat_inputs, chat_spans, span_mask
from qlocal.errors import UserError

Messages = list[dict[str, Any]]


@dataclass
class PairSample:
    """A preference pair: shared prompt messages, then the chosen and the rejected answer."""

    prompt: Messages
    chosen: Messages
    rejected: Messages
    where: str = ""
    tools: list[dict] | None = None


@dataclass
class KTOSample:
    """An unpaired answer to a prompt, labelled desirable (True) or undesirable (False)."""

    prompt: Messages
    completion: Messages
    label: bool
    where: str = ""
    tools: list[dict] | None = None


@dataclass
class PairExample:
    """A rendered pair: the prompt's tokens (shared by both sides) and each answer's tokens + mask."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    chosen_mask: list[int]
    rejected_mask: list[int]
    truncated: bool = False
    split_render: int = 0
    """Sides (0-2) whose answer was tokenised apart from the prompt (see the module docstring)."""
    where: str = ""
    ref_chosen: float | None = None
    """Reference sequence log-prob of prompt + chosen (train.precompute_ref), else None."""
    ref_rejected: float | None = None

    @property
    def length(self) -> int:
        """Tokens of the longer row (prompt + the longer side): the length batches bucket by."""
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))

    def scored(self) -> bool:
        """True when both sides keep a scored token (truncation can cut an answer away)."""
        return any(self.chosen_mask) and any(self.rejected_mask)

    def rows(self) -> tuple[Example, Example]:
        """(prompt + chosen, prompt + rejected) as Examples whose loss_mask is the answer's mask."""
        pad = [0] * len(self.prompt_ids)
        return (Example(self.prompt_ids + self.chosen_ids, pad + self.chosen_mask, self.truncated),
                Example(self.prompt_ids + self.rejected_ids, pad + self.rejected_mask, self.truncated))


@dataclass
class KTOExample:
    """A rendered labelled answer, and (after assign_kl) the mismatched answer of its KL row."""

    prompt_ids: list[int]
    completion_ids: list[int]
    completion_mask: list[int]
    label: bool
    truncated: bool = False
    split_render: int = 0
    where: str = ""
    kl_completion_ids: list[int] | None = None
    kl_completion_mask: list[int] | None = None
    ref: float | None = None
    """Reference sequence log-prob of prompt + completion (train.precompute_ref), else None."""
    ref_kl: float | None = None
    """Reference sequence log-prob of prompt + kl_completion."""

    @property
    def length(self) -> int:
        """Tokens of the longer row (its KL row included): the length batches bucket by."""
        return len(self.prompt_ids) + max(len(self.completion_ids), len(self.kl_completion_ids or []))

    def scored(self) -> bool:
        """True when the answer keeps a scored token after truncation."""
        return any(self.completion_mask)

    def rows(self) -> tuple[Example, ...]:
        """prompt + completion (and prompt + kl_completion once assigned) as Examples."""
        pad = [0] * len(self.prompt_ids)
        out = (Example(self.prompt_ids + self.completion_ids, pad + self.completion_mask, self.truncated),)
        if self.kl_completion_ids is not None and self.kl_completion_mask is not None:
            out += (Example(self.prompt_ids + self.kl_completion_ids, pad + self.kl_completion_mask),)
        return out


# --------------------------------------------------------------------------------------------
# Rendering


def _bos(tokenizer: Any) -> int | None:
    return tokenizer.bos_token_id if adds_bos(tokenizer) else None


def _prompt(prompt: Messages, answers: list[Messages], tools: list[dict] | None, where: str, tokenizer: Any,
            template: str) -> tuple[str, list[int]]:
    """The prompt's text (generation prompt included) and ids. Template variables come from the
    whole record, so a thinking switch is on when any answer thinks: the prompt then ends where
    every side's answer (its reasoning included) begins."""
    whole = Sample("chat", messages=prompt + [m for a in answers for m in a], where=where, tools=tools)
    messages, extra = chat_inputs(whole, template)
    text = apply_template(tokenizer, messages[: len(prompt)], template, True, where, extra)
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    bos = _bos(tokenizer)
    if bos is not None and (not ids or ids[0] != bos):
        ids = [bos] + ids  # as data.render does for a template without bos on a model with one
    return text, ids


def _answer(prompt: Messages, answer: Messages, tools: list[dict] | None, where: str, side: str, tokenizer: Any,
            template: str, train_on_reasoning: bool, p_text: str, p_ids: list[int]) -> tuple[list[int], list[int], bool]:
    """(answer ids, answer mask, tokenised apart from the prompt) for one side."""
    full, spans, cut = chat_spans(Sample("chat", messages=prompt + answer, where=where, tools=tools),
                                  tokenizer, template, train_on_reasoning)
    own = spans[sum(m["role"] == "assistant" for m in prompt):]
    if not own:
        raise UserError(f"{where}: the {side} answer has no assistant turn; fix the record or pass --skip-bad-lines")
    end = own[-1][1]
    prefix = full.startswith(p_text) and len(p_text) < end
    start = len(p_text) if prefix else own[0][0]
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offs = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    bos = _bos(tokenizer)
    body = p_ids[1:] if bos is not None and p_ids[:1] == [bos] and ids[:1] != [bos] else p_ids  # bos added by _prompt
    k = len(body)
    if prefix and ids[:k] == body and (k == 0 or offs[k - 1][1] <= start) and (k == len(ids) or offs[k][0] >= start):
        pairs = [(t, o) for t, o in zip(ids[k:], offs[k:]) if o[0] < end]
        split = False
    else:
        enc = tokenizer(full[start:end], add_special_tokens=False, return_offsets_mapping=True)
        pairs = [(t, (a + start, b + start)) for t, (a, b) in zip(enc["input_ids"], enc["offset_mapping"])]
        split = True
    answer_ids = [t for t, _ in pairs]
    mask = span_mask([o for _, o in pairs], own, cut)
    if not any(mask):
        raise UserError(f"{where}: the {side} answer renders to no scored tokens (empty after the chat template); "
                        "fix the record or pass --skip-bad-lines")
    return answer_ids, mask, split


def _truncate(prompt: list[int], sides: list[tuple[list[int], list[int]]], max_len: int | None,
              bos: int | None) -> tuple[list[int], list[tuple[list[int], list[int]]], bool]:
    """Cut the prompt's start (keeping a leading bos), not below half of max_len, then the answers' ends."""
    longest = max(len(ids) for ids, _ in sides)
    if max_len is None or len(prompt) + longest <= max_len:
        return prompt, sides, False
    keep = min(len(prompt), max(max_len - longest, max_len // 2, 1))
    if keep < len(prompt):
        head = prompt[:1] if bos is not None and prompt[0] == bos and keep > 1 else []
        prompt = head + prompt[len(prompt) - (keep - len(head)):]
    room = max(max_len - len(prompt), 0)
    return prompt, [(ids[:room], m[:room]) for ids, m in sides], True


def render_pair(sample: PairSample, tokenizer: Any, template: str, max_seq_len: int | None = None,
                train_on_reasoning: bool = True) -> PairExample:
    """Render a pair through the chat template (see the module docstring); a side that renders to
    nothing scored, or two sides that render to the same tokens, is a UserError naming the record."""
    p_text, p_ids = _prompt(sample.prompt, [sample.chosen, sample.rejected], sample.tools, sample.where,
                            tokenizer, template)
    c_ids, c_mask, c_split = _answer(sample.prompt, sample.chosen, sample.tools, sample.where, "chosen", tokenizer,
                                     template, train_on_reasoning, p_text, p_ids)
    r_ids, r_mask, r_split = _answer(sample.prompt, sample.rejected, sample.tools, sample.where, "rejected",
                                     tokenizer, template, train_on_reasoning, p_text, p_ids)
    if c_ids == r_ids:
        raise UserError(f"{sample.where}: 'chosen' and 'rejected' render to the same tokens, so there is no "
                        "preference to learn; fix the record or pass --skip-bad-lines")
    prompt, ((c_ids, c_mask), (r_ids, r_mask)), cut = _truncate(p_ids, [(c_ids, c_mask), (r_ids, r_mask)],
                                                                max_seq_len, _bos(tokenizer))
    return PairExample(prompt, c_ids, r_ids, c_mask, r_mask, cut, int(c_split) + int(r_split), sample.where)


def render_kto(sample: KTOSample, tokenizer: Any, template: str, max_seq_len: int | None = None,
               train_on_reasoning: bool = True) -> KTOExample:
    """Render a labelled answer as render_pair renders one side."""
    p_text, p_ids = _prompt(sample.prompt, [sample.completion], sample.tools, sample.where, tokenizer, template)
    ids, mask, split = _answer(sample.prompt, sample.completion, sample.tools, sample.where, "completion",
                               tokenizer, template, train_on_reasoning, p_text, p_ids)
    prompt, ((ids, mask),), cut = _truncate(p_ids, [(ids, mask)], max_seq_len, _bos(tokenizer))
    return KTOExample(prompt, ids, mask, sample.label, cut, int(split), sample.where)


def assign_kl(examples: list[KTOExample], batch_size: int, max_seq_len: int | None = None) -> None:
    """Give every example the answer its KL row pairs with its prompt, as TRL's KTOTrainer builds
    its KL data: answers rotated by one within consecutive groups of `batch_size` examples in
    dataset order, (x1, yn), (x2, y1), ..., (xn, yn-1). A group of one pairs an example with its own
    answer. The KL answer is cut to fit max_seq_len after its prompt."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    for start in range(0, len(examples), batch_size):
        group = examples[start:start + batch_size]
        for i, ex in enumerate(group):
            other = group[i - 1]  # i = 0 takes the group's last
            room = len(other.completion_ids) if max_seq_len is None else max(max_seq_len - len(ex.prompt_ids), 0)
            ex.kl_completion_ids = other.completion_ids[:room]
            ex.kl_completion_mask = other.completion_mask[:room]


# --------------------------------------------------------------------------------------------
# Collation


def _refs(values: list[float | None]) -> np.ndarray | None:
    if all(v is not None for v in values):
        return np.asarray(values, dtype=np.float32)
    if any(v is not None for v in values):
        raise ValueError("some examples carry reference log-probs and some do not; precompute all or none")
    return None


def collate_pairs(pairs: Sequence[PairExample], pad_id: int) -> dict[str, np.ndarray]:
    """Right-padded (2n, T) batch of n pairs: chosen rows first, then the rejected rows in the same
    order, with per-row `chosen` (and `ref_logp` when precomputed); see the module docstring."""
    if not pairs:
        raise ValueError("collate_pairs needs at least one pair")
    rows = [p.rows() for p in pairs]
    batch = collate([c for c, _ in rows] + [r for _, r in rows], pad_id)
    n = len(pairs)
    batch["chosen"] = np.asarray([1] * n + [0] * n, dtype=np.int64)
    refs = _refs([p.ref_chosen for p in pairs] + [p.ref_rejected for p in pairs])
    if refs is not None:
        batch["ref_logp"] = refs
    return batch


def collate_kto(examples: Sequence[KTOExample], pad_id: int) -> dict[str, np.ndarray]:
    """Right-padded batch: the n matched rows, then the n KL rows when every example has one
    (assign_kl), with per-row `label`, `kl` (and `ref_logp` when precomputed)."""
    if not examples:
        raise ValueError("collate_kto needs at least one example")
    with_kl = [e.kl_completion_ids is not None for e in examples]
    if any(with_kl) and not all(with_kl):
        raise ValueError("some KTO examples have a KL answer and some do not; call assign_kl on all of them")
    rows = [e.rows() for e in examples]
    matched, kl = [r[0] for r in rows], [r[1] for r in rows if len(r) > 1]
    batch = collate(matched + kl, pad_id)
    labels = [int(e.label) for e in examples]
    batch["label"] = np.asarray(labels + (labels if kl else []), dtype=np.int64)
    batch["kl"] = np.asarray([0] * len(matched) + [1] * len(kl), dtype=np.int64)
    refs = _refs([e.ref for e in examples] + ([e.ref_kl for e in examples] if kl else []))
    if refs is not None:
        batch["ref_logp"] = refs
    return batch


def render_preference(samples: Sequence[PairSample | KTOSample], tokenizer: Any, template: str,
                      max_seq_len: int | None, train_on_reasoning: bool = True,
                      drop_long: bool = False) -> tuple[list[PairExample | KTOExample], dict[str, int]]:
    """Render every sample; leave out those longer than max_seq_len when drop_long, and those whose
    truncation cut a side's scored tokens away. Returns (examples, counts): truncated, dropped_long,
    unscored, split_render (sides tokenised apart from their prompt)."""
    counts = {"truncated": 0, "dropped_long": 0, "unscored": 0, "split_render": 0}
    out: list[PairExample | KTOExample] = []
    for s in samples:
        ex = (render_kto if isinstance(s, KTOSample) else render_pair)(s, tokenizer, template, max_seq_len,
                                                                        train_on_reasoning)
        counts["split_render"] += ex.split_render
        if ex.truncated and drop_long:
            counts["dropped_long"] += 1
            continue
        counts["truncated"] += int(ex.truncated)
        if not ex.scored():
            counts["unscored"] += 1
            continue
        out.append(ex)
    return out, counts
