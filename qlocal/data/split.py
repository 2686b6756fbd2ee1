"""Which records a run held out for validation: one rule for training, export and eval.

`data.val_path` names them outright; otherwise `data.val_split` carves a seeded random fraction out
of the training records (train.seed), so export can rebuild the same held-out set from config.yaml
alone (the tool-call preflight answers those prompts, never ones the run trained on).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from qlocal.errors import UserError


def split_validation(samples: list[Any], val_split: float, seed: int) -> tuple[list[Any], list[Any]]:
    """(train, val): round(len * val_split) records (at least one) picked by `seed`, both in file order."""
    if val_split <= 0:
        return samples, []
    order = np.random.default_rng(seed).permutation(len(samples))
    n_val = max(1, round(len(samples) * val_split))
    if n_val >= len(samples):
        raise UserError(f"data.val_split={val_split} leaves no training records out of {len(samples)}")
    return [samples[i] for i in sorted(order[n_val:])], [samples[i] for i in sorted(order[:n_val])]


def held_out_samples(cfg: Any) -> list[Any]:
    """The run's validation samples (data.val_path, or the data.val_split share of data.path), as
    training chose them; empty when the run held none out. A preference run's are its pairs (or KTO
    answers), split exactly as qlocal.preference_run splits them."""
    dc = cfg.data
    if dc.val_path:
        return run_samples(cfg, dc.val_path)
    if dc.val_split <= 0:
        return []
    return split_validation(run_samples(cfg, dc.path), dc.val_split, cfg.train.seed)[1]


def run_samples(cfg: Any, path: str) -> list[Any]:
    """Every record of `path` as the run's training reads it: SFT samples, or for a preference
    method (train.method) its PairSample / KTOSample records."""
    from qlocal.data.formats import load_samples
    from qlocal.data.mapping import mapping_from_config

    dc, method = cfg.data, getattr(cfg.train, "method", "sft")
    if method != "sft":
        from qlocal.data.pref_formats import load_preference

        return load_preference(path, method, dc)[0]
    return load_samples(path, dc.format, dc.split, skip_bad_lines=dc.skip_bad_lines, mapping=mapping_from_config(dc),
                        tools=dc.tools)[0]
