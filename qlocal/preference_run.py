"""What a preference run (train.method dpo/orpo/kto/simpo) adds to the training loop of train.py.

The loop is the SFT loop: the same schedule (a pure function of seed and step), checkpoints,
resume and metrics. The differences are all here: the data are rendered pairs or labelled answers
(qlocal.data.preference), batched by their own collation, never packed; before each step the
reference fields are filled (qlocal.reference); with train.precompute_ref the base scores every
example once first. The objective comes from qlocal.preference_losses.objective_for.
"""

from __future__ import annotations

import sys
from functools import partial
from typing import Any, Callable

from qlocal import distributed
from qlocal.config import Config
from qlocal.errors import UserError

Collate = Callable[[list[Any]], dict[str, Any]]


def is_preference(cfg: Config) -> bool:
    """Whether the run trains a preference method rather than SFT."""
    return cfg.train.method != "sft"


def load(cfg: Config) -> tuple[list[Any], list[Any], str]:
    """Read and split the preference records, no tokenizer needed: (train, val, format)."""
    from qlocal.data.pref_formats import load_preference
    from qlocal.data.split import split_validation

    dc, method = cfg.data, cfg.train.method
    samples, stats = load_preference(dc.path, method, dc)
    if stats.get("skipped") and distributed.from_env().is_main:
        print(f"warning: skipped {stats['skipped']} bad records in {dc.path} "
              f"(first: {', '.join(stats.get('skipped_where', []))})", file=sys.stderr)
    if dc.val_path:
        val_samples, _ = load_preference(dc.val_path, method, dc)
    else:
        samples, val_samples = split_validation(samples, dc.val_split, cfg.train.seed)
    return samples, val_samples, str(stats.get("format", "?"))


def prepare(cfg: Config, tokenizer: Any, template: str, samples: list[Any] | None = None,
            val_samples: list[Any] | None = None) -> tuple[list[Any], list[Any], int, int]:
    """Render the preference records `load` read (read here when not given): (train, val, truncated, dropped_long).

    KTO examples get their KL rows' answers (assign_kl, TRL's rotation within groups of the
    micro-batch size) before batching, so a precomputed reference covers them too.
    """
    from qlocal.data.preference import assign_kl, render_preference

    dc, method = cfg.data, cfg.train.method
    main = distributed.from_env().is_main
    if samples is None or val_samples is None:
        samples, val_samples, _ = load(cfg)

    def render(items: list[Any]) -> tuple[list[Any], dict[str, int]]:
        return render_preference(items, tokenizer, template, dc.max_seq_len, dc.train_on_reasoning, dc.drop_long)

    (train, tc), (val, vc) = render(samples), render(val_samples)
    if not train:
        raise UserError(f"{dc.path}: no record keeps a scored answer on both sides after truncating at "
                        f"data.max_seq_len={dc.max_seq_len}; raise it")
    if method == "kto":
        for part in (train, val):
            assign_kl(part, cfg.train.batch_size, dc.max_seq_len)
    truncated, dropped = tc["truncated"] + vc["truncated"], tc["dropped_long"] + vc["dropped_long"]
    if (truncated or dropped) and main:
        what = f"dropped {dropped}" if dropped else f"truncated {truncated}"
        print(f"warning: {what} preference records longer than data.max_seq_len={dc.max_seq_len} "
              "(prompt start and answer ends cut); raise --max-seq-len to keep them whole", file=sys.stderr)
    return train, val, truncated, dropped


def collate_fn(cfg: Config, pad_id: int) -> Collate:
    """The method's batch collation (pairs: chosen block then rejected block; KTO: matched then KL rows)."""
    from qlocal.data.preference import collate_kto, collate_pairs

    return partial(collate_kto if cfg.train.method == "kto" else collate_pairs, pad_id=pad_id)


def length(example: Any) -> int:
    """The length an example is bucketed by (its longest row)."""
    return int(example.length) if hasattr(example, "length") else len(example.input_ids)


def precompute_reference(backend: Any, cfg: Config, examples: list[Any], collate: Collate, quiet: bool) -> None:
    """train.precompute_ref: the base's scores of every example, kept on the examples (a resumed
    run recomputes the same numbers: the base never changes)."""
    from qlocal import reference

    if not (cfg.train.precompute_ref and examples):
        return
    if not quiet:
        print(f"reference scoring {len(examples)} examples once (train.precompute_ref)", file=sys.stderr)
    reference.precompute(backend, examples, collate, max(cfg.train.batch_size, 1))
