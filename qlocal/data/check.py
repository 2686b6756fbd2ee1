"""`qlocal data check FILE --model M`: what the data looks like after templating and masking."""

from __future__ import annotations

from typing import Any

import numpy as np

from qlocal.data.formats import Sample, empty_answer_warning, empty_answers, load_samples
from qlocal.data.render import Example, render, render_for_display
from qlocal.data.tools import tool_stats


def _stats_line(name: str, values: list[int]) -> str:
    a = np.asarray(values, dtype=np.float64)
    return (f"  {name:<15} min {int(a.min())}  mean {a.mean():.1f}  median {np.median(a):.0f}  "
            f"p95 {np.percentile(a, 95):.0f}  max {int(a.max())}")


def _tool_lines(samples: list[Sample], train_on_reasoning: bool) -> list[str]:
    """What the tool and reasoning data holds; nothing for a dataset without either."""
    st = tool_stats(samples)
    if not (st["with_tools"] or st["calls"] or st["results"] or st["reasoning_turns"]):
        return []
    names = ", ".join(st["names"][:12]) + (", ..." if len(st["names"]) > 12 else "")
    lines = ["", "tools and reasoning:",
             f"  tools           {len(st['names'])} schemas in {st['with_tools']} records" + (f" ({names})" if names else ""),
             f"  tool calls      {st['calls']} ({st['parallel_turns']} turns with parallel calls), trained",
             f"  tool results    {st['results']}, not trained"]
    if st["reasoning_turns"]:
        lines.append(f"  reasoning       {st['reasoning_turns']} assistant turns, "
                     + ("trained" if train_on_reasoning else "not trained (data.train_on_reasoning: false)"))
    return lines


def _is_preference(path: str, cfg_data: Any, method: str) -> bool:
    from qlocal.data.pref_formats import PREF_COLUMNS, detect_preference
    from qlocal.data.readers import load_records

    if method != "sft" or set(getattr(cfg_data, "columns", None) or {}) & (set(PREF_COLUMNS) - {"system", "tools"}):
        return True
    record = load_records(path, getattr(cfg_data, "split", "train"), [])[0][0]
    shape = detect_preference(record)
    return shape is not None and (shape != "kto" or isinstance(record.get("label"), bool))


def check_report(path: str, tokenizer: Any, template: str, cfg_data: Any, method: str = "sft") -> str:
    """Text report for a data file: records per format, token-length statistics, truncation at
    max_seq_len, tools/calls/results/reasoning counts, and an example rendered with its trained
    spans marked [[ ... ]] (the first that calls a tool, if any does). Preference data (pairs, KTO;
    or any file under a preference train.method) gets qlocal.data.pref_check's report."""
    from qlocal.data.mapping import mapping_from_config

    if _is_preference(path, cfg_data, method):
        from qlocal.data.pref_check import preference_report

        return preference_report(path, tokenizer, template, cfg_data, None if method == "sft" else method)

    samples, stats = load_samples(path, cfg_data.format, getattr(cfg_data, "split", "train"),
                                  skip_bad_lines=getattr(cfg_data, "skip_bad_lines", False),
                                  mapping=mapping_from_config(cfg_data), tools=getattr(cfg_data, "tools", None))
    max_len = cfg_data.max_seq_len
    reasoning = getattr(cfg_data, "train_on_reasoning", True)
    # Render untruncated so the statistics show the real lengths.
    examples: list[Example] = [render(s, tokenizer, template, cfg_data.train_on_prompt, train_on_reasoning=reasoning)
                               for s in samples]
    lengths = [len(e.input_ids) for e in examples]
    targets = [sum(e.loss_mask[1:]) for e in examples]
    too_long = [i for i, n in enumerate(lengths) if n > max_len]
    empty_after_cut = sum(1 for i in too_long if sum(examples[i].loss_mask[1:max_len]) == 0)

    counts = ", ".join(f"{fmt}: {n}" for fmt, n in stats["counts"].items())
    lines = [f"{path}: {len(samples)} records ({counts})"]
    if stats["skipped"]:
        lines.append(f"  skipped {stats['skipped']} bad records (first: {', '.join(stats['skipped_where'])})")
    mode = ("all text tokens" if stats["format"] == "text" else
            "all tokens (train_on_prompt)" if cfg_data.train_on_prompt else "assistant turns only")
    lines += ["", f"tokens per example (trained: {mode}):",
              _stats_line("input", lengths), _stats_line("trained", targets),
              f"  total           {sum(lengths)} tokens, {sum(targets)} trained"]
    if too_long:
        worst = max(too_long, key=lambda i: lengths[i])
        lines.append(f"  {len(too_long)} of {len(samples)} examples exceed max_seq_len={max_len} and will be "
                     f"truncated (longest: {samples[worst].where}, {lengths[worst]} tokens)")
        if empty_after_cut:
            lines.append(f"  {empty_after_cut} of them keep no trained tokens after truncation; raise max_seq_len")
    else:
        lines.append(f"  none exceed max_seq_len={max_len}")
    no_targets = [s.where for s, n in zip(samples, targets) if n == 0]
    if no_targets:
        lines.append(f"  {len(no_targets)} examples have no trained tokens (first: {no_targets[0]})")
    empty = empty_answers(samples)
    if empty:
        lines.append(f"  {empty_answer_warning(path, empty)}")
    lines += _tool_lines(samples, reasoning)
    shown = next((s for s in samples if any(m.get("tool_calls") for m in s.messages)), samples[0])
    first = render(shown, tokenizer, template, cfg_data.train_on_prompt, max_len, train_on_reasoning=reasoning)
    lines += ["", f"example {shown.where} (trained spans in [[ ]]):", render_for_display(first, tokenizer)]
    return "\n".join(lines)
