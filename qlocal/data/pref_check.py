"""`qlocal data check` on preference data: counts, token lengths, truncation, length bias, and one
pair (or KTO answer) rendered with the scored spans marked [[ ... ]]."""

from __future__ import annotations

from typing import Any

import numpy as np

from qlocal.data.pref_formats import load_preference
from qlocal.data.preference import KTOExample, PairExample, render_kto, render_pair
from qlocal.data.render import render_for_display


def _stats_line(name: str, values: list[int]) -> str:
    a = np.asarray(values, dtype=np.float64)
    return (f"  {name:<15} min {int(a.min())}  mean {a.mean():.1f}  median {np.median(a):.0f}  "
            f"p95 {np.percentile(a, 95):.0f}  max {int(a.max())}")


def _pair_lines(examples: list[PairExample]) -> list[str]:
    chosen = [len(e.chosen_ids) for e in examples]
    rejected = [len(e.rejected_ids) for e in examples]
    longer = sum(c > r for c, r in zip(chosen, rejected))
    diff = float(np.mean(np.subtract(chosen, rejected)))
    lines = ["", "tokens per pair (scored: each side's answer):",
             _stats_line("prompt", [len(e.prompt_ids) for e in examples]),
             _stats_line("chosen", chosen), _stats_line("rejected", rejected),
             _stats_line("scored chosen", [sum(e.chosen_mask) for e in examples]),
             _stats_line("scored rejected", [sum(e.rejected_mask) for e in examples]),
             f"  chosen longer than rejected in {longer} of {len(examples)} pairs (mean difference {diff:+.1f} tokens)"]
    shorter = sum(c < r for c, r in zip(chosen, rejected))
    if len(examples) > 1 and len(examples) in (longer, shorter):
        way = "longer" if longer else "shorter"
        lines.append(f"  chosen is {way} in every pair, so length alone separates the sides (simpo normalises by length)")
    return lines


def _kto_lines(examples: list[KTOExample]) -> list[str]:
    good = sum(e.label for e in examples)
    return ["", f"labels: {good} desirable, {len(examples) - good} undesirable",
            "tokens per example (scored: the completion):",
            _stats_line("prompt", [len(e.prompt_ids) for e in examples]),
            _stats_line("completion", [len(e.completion_ids) for e in examples])]


def preference_report(path: str, tokenizer: Any, template: str, cfg_data: Any, method: str | None) -> str:
    """Text report for a preference data file as train.method `method` reads it (None: as the file
    is, pairs or KTO); see the module docstring."""
    samples, stats = load_preference(path, method, cfg_data)
    reasoning = getattr(cfg_data, "train_on_reasoning", True)
    max_len = cfg_data.max_seq_len
    examples = [(render_kto if hasattr(s, "label") else render_pair)(s, tokenizer, template, None, reasoning)
                for s in samples]  # untruncated: the statistics show the real lengths
    counts = ", ".join(f"{fmt}: {n}" for fmt, n in stats["counts"].items())
    lines = [f"{path}: {sum(stats['counts'].values())} records ({counts})"]
    if stats["unpaired"]:
        lines.append(f"  unpaired for kto: {len(samples)} examples (chosen desirable, rejected undesirable)")
    if stats["skipped"]:
        lines.append(f"  skipped {stats['skipped']} bad records (first: {', '.join(stats['skipped_where'])})")
    pairs = [e for e in examples if isinstance(e, PairExample)]
    lines += _pair_lines(pairs) if pairs else _kto_lines([e for e in examples if isinstance(e, KTOExample)])
    too_long = [i for i, e in enumerate(examples) if e.length > max_len]
    if too_long:
        worst = max(too_long, key=lambda i: examples[i].length)
        lines.append(f"  {len(too_long)} of {len(examples)} exceed max_seq_len={max_len} (prompt + longer answer) and "
                     f"will be truncated: the prompt's start, then the answers' ends "
                     f"(longest: {samples[worst].where}, {examples[worst].length} tokens)")
    else:
        lines.append(f"  none exceed max_seq_len={max_len}")
    split = sum(e.split_render for e in examples)
    if split:
        lines.append(f"  {split} answers tokenised apart from their prompt (the template renders the prompt alone "
                     "differently, or a token spans the boundary); they follow the prompt as at inference")
    first = examples[0]
    head = f"example {samples[0].where} (scored spans in [[ ]])"
    if isinstance(first, PairExample):
        chosen, rejected = first.rows()
        lines += ["", f"{head}, chosen:", render_for_display(chosen, tokenizer),
                  "", "rejected:", render_for_display(rejected, tokenizer)]
    else:
        label = "desirable" if first.label else "undesirable"
        lines += ["", f"{head}, {label}:", render_for_display(first.rows()[0], tokenizer)]
    return "\n".join(lines)
