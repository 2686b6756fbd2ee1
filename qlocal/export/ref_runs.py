"""Batched forwards and greedy decoding shared by the reference runners (qlocal.export.layerwise).

Greedy continuations start from one forward of each prompt plus a draft (a GGUF's own greedy
tokens), checked the way speculative decoding checks them; every further token is one step on that
forward's KV cache (one token per sequence through the weights), or a whole forward where a cache
would not compute the same thing. Either way the tokens and logits are plain greedy decoding's.

The forwards run on torch threads sized to the free cores: torch's OpenMP threads spin at each
barrier like ggml's, so more threads than free cores burn CPU waiting for a descheduled one (a
cached step of the 0.5B bench model: 3.0 CPU-s with 2 threads at load 5, 0.92 with 1).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np


def free_cores(most: int = 4) -> int:
    """The cores other processes leave free (1-minute load average, this process counted as one),
    at least 1 and at most `most`."""
    n = os.cpu_count() or 1
    try:
        busy = max(0.0, os.getloadavg()[0] - 1.0)
    except OSError:  # no load average on this platform
        busy = 0.0
    return max(1, min(most, n, round(n - busy)))


@contextmanager
def _torch_threads() -> Iterator[None]:
    """torch's intra-op threads set to the free cores for a forward, restored after (never more
    than torch's own setting)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(free_cores(before))
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class GreedyRun:
    """Logits of the prompts, their greedy continuations and the logits that chose each token."""

    prompt_logits: list[np.ndarray]  # (len(prompt), vocab) float32 per prompt
    tokens: list[list[int]]
    step_logits: list[np.ndarray]  # (n, vocab): row k is the distribution token k was taken from
    forwards: int = 0  # forwards it took (passes over the weights, layer by layer)


class _Runs:
    """Batched forwards and greedy decoding over `self.model` (any causal LM taking logits_to_keep)."""

    model: Any
    config: Any
    mode: str

    def _forward(self, seqs: list[list[int]], keep: list[int] | None, cache: bool = False) -> tuple[Any, Any]:
        """Logits (batch, positions, vocab) of right-padded `seqs` at positions `keep` (all if None),
        and with `cache` the KV cache the forward filled (else None).

        Right padding needs no mask: attention is causal, so a real position never sees the pad
        after it."""
        import torch

        width = max(len(s) for s in seqs)
        ids = torch.tensor([s + [s[-1]] * (width - len(s)) for s in seqs])
        to_keep: Any = 0 if keep is None else torch.tensor(keep)
        with torch.no_grad(), _torch_threads():
            out = self.model(input_ids=ids, use_cache=cache, logits_to_keep=to_keep)
        return out.logits, (getattr(out, "cache", None) or getattr(out, "past_key_values", None)) if cache else None

    def _groups(self, seqs: list[list[int]]) -> list[list[int]]:
        """Indices of sequences that may share a forward. Rope types that switch on the sequence length
        (LongRoPE, dynamic NTK) see the padded length, so sequences on both sides of that threshold
        run apart."""
        limit = _rope_length_threshold(self.config)
        if limit is None:
            return [list(range(len(seqs)))]
        short = [i for i, s in enumerate(seqs) if len(s) <= limit]
        long = [i for i, s in enumerate(seqs) if len(s) > limit]
        return [g for g in (short, long) if g]

    def logits(self, seqs: list[list[int]]) -> list[np.ndarray]:
        """Float32 logits (len, vocab) for every position of each sequence.

        Views into the padded batch, not copies: a copy would hold every logit twice at the peak (on a
        152k vocabulary a batch of three 111-token probes is 200 MB)."""
        out: list[np.ndarray | None] = [None] * len(seqs)
        for group in self._groups(seqs):
            batch = self._forward([seqs[i] for i in group], None)[0].numpy()
            for j, i in enumerate(group):
                out[i] = batch[j, : len(seqs[i])]
            del batch
        return out  # type: ignore[return-value]

    def greedy(self, prompts: list[list[int]], n: int, draft: list[list[int]] | None = None) -> GreedyRun:
        """The prompts' logits and `n` greedy tokens each (argmax, never stopping at EOS).

        `draft` (optional, per prompt) is a guess of the continuation, e.g. a GGUF's own greedy
        tokens. The first forward runs each prompt plus its draft and takes tokens while the model's
        argmax equals the draft, then the model's own token where it differs (speculative decoding's
        rule). Every later token costs one step: on the first forward's KV cache where that gives
        what a whole forward would (_cacheable), else a whole forward of the sequence so far. The
        tokens and logits are those of plain greedy decoding whatever the draft is; a good draft
        only saves steps (one pass over the weights for a whole continuation)."""
        limit = _rope_length_threshold(self.config)
        seqs = [list(p) for p in prompts]
        cands = [list(d[:n]) for d in draft] if draft is not None else [[] for _ in seqs]
        if limit is not None:  # a draft must not carry a sequence over the rope's length switch
            for i, s in enumerate(seqs):
                if len(s) <= limit:
                    cands[i] = cands[i][: max(0, limit - len(s))]
        use_cache = self._cacheable([len(s) + len(c) for s, c in zip(seqs, cands)], n)
        prompt_logits: list[np.ndarray] = [np.empty(0, np.float32)] * len(seqs)
        steps: list[list[np.ndarray]] = [[] for _ in seqs]
        first, forwards = True, 0
        while first or any(len(s) < n for s in steps):
            todo = [i for i in range(len(seqs)) if first or len(steps[i]) < n]
            full = [seqs[i] + cands[i] for i in todo]
            for group in self._groups(full):
                sub = [full[g] for g in group]
                # Rows whose argmax is the next token after the accepted part, then after each draft token.
                rows = {todo[g]: list(range(len(seqs[todo[g]]) - 1, len(full[g]))) for g in group}
                keep = None if first else sorted({r for rs in rows.values() for r in rs})
                logits, cache = self._forward(sub, keep, cache=first and use_cache)
                batch = logits.numpy()
                forwards += 1
                for j, g in enumerate(group):
                    i = todo[g]
                    if first:
                        prompt_logits[i] = batch[j, : len(prompts[i])]
                    for k, r in enumerate(rows[i]):
                        if len(steps[i]) >= n:
                            break
                        row = batch[j, r if keep is None else keep.index(r)].copy()
                        steps[i].append(row)
                        token = int(np.argmax(row))
                        seqs[i].append(token)
                        if k >= len(cands[i]) or token != cands[i][k]:
                            break
                    cands[i] = []  # the draft is used up or wrong from here on
                del batch, logits
                if cache is not None:
                    forwards += self._cached_steps(cache, max(len(f) for f in sub), seqs, steps, n)
                    del cache
            first = False
        return GreedyRun(prompt_logits, [s[len(p):] for s, p in zip(seqs, prompts)],
                         [np.stack(r) if r else np.empty((0, 0), np.float32) for r in steps], forwards)

    def _cacheable(self, widths: list[int], n: int) -> bool:
        """Whether greedy steps on the first forward's KV cache compute what whole forwards would:
        no sliding window or attention chunk that the sequences (padded, plus `n` steps) outgrow (a
        rejected draft leaves masked gaps in a row of the cache, which a window would count), and no
        rope that switches on the length within them."""
        text = self.config.get_text_config() if hasattr(self.config, "get_text_config") else self.config
        longest = max(widths) + n
        window = getattr(text, "sliding_window", None)
        if (window and longest >= window - 1) or getattr(text, "attention_chunk_size", None):
            return False
        limit = _rope_length_threshold(self.config)
        return limit is None or longest <= limit

    def _cached_steps(self, cache: Any, width: int, seqs: list[list[int]], steps: list[list[np.ndarray]],
                      n: int) -> int:
        """Greedy tokens one KV-cached step at a time (one token per sequence through the weights) for
        the sequences short of `n`, after the first forward of right-padded rows `width` wide filled
        `cache`; appends to `seqs` and `steps` and returns the steps taken."""
        import inspect

        import torch

        todo = [i for i in range(len(seqs)) if len(steps[i]) < n]
        if not todo:
            return 0
        cache.batch_select_indices(torch.tensor(todo))
        # A row's first len(seq) - 1 entries are its tokens as the first forward saw them; the rest
        # (the rejected draft, the padding) is masked out. Positions are the sequence's own.
        mask = torch.zeros(len(todo), width, dtype=torch.long)
        for j, i in enumerate(todo):
            mask[j, : len(seqs[i]) - 1] = 1
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        kw = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
        taken = 0
        while any(len(steps[i]) < n for i in todo):
            mask = torch.cat([mask, torch.ones(len(todo), 1, dtype=torch.long)], dim=1)
            ids = torch.tensor([[seqs[i][-1]] for i in todo])
            pos = torch.tensor([[len(seqs[i]) - 1] for i in todo])
            with torch.no_grad(), _torch_threads():
                out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                                 logits_to_keep=1, **{kw: cache})
            logits = out.logits[:, -1].numpy()
            taken += 1
            for j, i in enumerate(todo):
                if len(steps[i]) < n:  # a finished row rides along; its output is ignored
                    steps[i].append(logits[j].copy())
                    seqs[i].append(int(np.argmax(logits[j])))
        return taken


def _rope_length_threshold(config: Any) -> int | None:
    """The length above which the model's rope changes (LongRoPE, dynamic NTK), if it has one."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    params = getattr(text, "rope_parameters", None) or {}
    kinds = params.values() if params and all(isinstance(v, dict) for v in params.values()) else [params]
    if not any(isinstance(p, dict) and p.get("rope_type") in ("longrope", "dynamic") for p in kinds):
        return None
    return int(getattr(text, "original_max_position_embeddings", None) or text.max_position_embeddings)
