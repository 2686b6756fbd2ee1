"""`qlocal eval` on preference data: held-out pairs (or KTO answers) scored as training scores them.

A file whose first record is a pair (prompt/chosen/rejected, whole conversations, or the run's
data.columns for them) or a KTO answer (prompt/completion/true-false label) is read and rendered
exactly as a preference run reads its validation data (qlocal.data.pref_formats, .preference:
template, shared prompt tokens, truncation), batched by the method's own collation, and scored by
the training backend (torch or MLX):

- the policy's sequence log-probs (adapter on) and the reference's (the same base with the
  adapter off, qlocal.reference: also KTO's KL estimate, here over the whole file);
- the loss and metrics from `scored_loss` of the run's objective (qlocal.preference_losses): the
  function training differentiates, so `loss` equals the run's `val_loss` on the same records.

The method is the run's `train.method` and its `preference` hyperparameters; a run trained with
SFT (or a plain model) is scored with DPO on pairs and KTO on labelled answers, at the defaults.
Metrics carry TRL's names (DPOTrainer's rewards/chosen, rewards/rejected, rewards/accuracies,
rewards/margins, logps/chosen, logps/rejected; ORPO's nll_loss and log_odds_ratio; KTO's kl) and
are means over all pairs; TRL's evaluation averages per-batch means, the same number when every
batch holds as many pairs. `--compare-base` scores the base as the policy too: for DPO and KTO
that is the reference itself (rewards 0, loss ln 2), so the columns show what the adapter moved.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from qlocal.errors import UserError

METRICS = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected",
           "logps/chosen", "logps/rejected", "nll_loss", "log_odds_ratio", "kl")


class _NumpyXP:
    """numpy as an objective's `xp` (float64 on the host); sigmoid is the one name numpy lacks."""

    def __getattr__(self, name: str) -> Any:
        return getattr(np, name)

    @staticmethod
    def sigmoid(x: Any) -> Any:
        return 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free logistic


def preference_method(data: str, split: str, cfg: Any) -> str | None:
    """The method to score `data` with, or None when it is not preference data (the SFT path)."""
    from qlocal.data.pref_formats import file_shape

    run_method = getattr(cfg.train, "method", "sft")
    shape = file_shape(data, split, cfg.data if run_method != "sft" else None)
    if shape is None:
        return None
    if shape == "kto":
        return "kto"  # labelled answers carry no pair: KTO's loss is the one they have
    return run_method if run_method != "sft" else "dpo"


def _data_config(cfg: Any, split: str, preference_run: bool) -> Any:
    dc = copy.deepcopy(cfg.data)
    dc.format, dc.split = "auto", split
    if not preference_run:  # an SFT run's mapping builds chat turns; pairs are read by their own keys
        dc.columns, dc.label_map = {}, {}
        dc.prompt_template = dc.response_template = dc.system_prompt = None
    return dc


def score(backend: Any, batches: list[dict[str, np.ndarray]], objective: Any, base: bool = False) -> dict[str, float]:
    """Mean loss and metrics of the objective over the batches, the policy being the adapter
    (base=False) or the base model itself (base=True); the reference is always the base."""
    from qlocal import reference
    from qlocal.objectives import TOKEN_FIELDS
    from qlocal.preference_losses import summarize

    done = reference.complete(backend, batches, objective, policy_adapter=not base)
    backend.set_adapter_enabled(not base)
    xp, loss, count = _NumpyXP(), 0.0, 0
    sums: dict[str, float] = {}
    for b in done:
        total = backend.sequence_logprobs(b).astype(np.float64)
        length = b["loss_mask"][:, 1:].sum(axis=-1).astype(np.float64)
        rows = {k: np.asarray(v, dtype=np.float64) for k, v in b.items() if k not in TOKEN_FIELDS}
        part, metrics = objective.scored_loss(total, length, rows, xp)
        loss += float(part)
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        count += objective.count(b)
    n = max(count, 1)
    return {"loss": loss / n, **summarize(objective, {k: v / n for k, v in sums.items()}), "count": count}


def load_eval_data(cfg: Any, opts: Any, method: str) -> tuple[list[Any], dict[str, Any]]:
    """opts.data's preference records as `method` reads them: (samples, stats); no model needed, so
    eval reads them (and names a bad line) before any model loads."""
    from qlocal.data.pref_formats import load_preference

    dc = _data_config(cfg, opts.split, getattr(cfg.train, "method", "sft") != "sft")
    dc.skip_bad_lines = dc.skip_bad_lines or getattr(opts, "skip_bad_lines", False)
    return load_preference(opts.data, method, dc)


def evaluate_preference(scorer: Any, kind: str, cfg: Any, opts: Any, method: str, target: str,
                        loaded: tuple[list[Any], dict[str, Any]] | None = None) -> dict[str, Any]:
    """The eval report of `target` on opts.data, a preference file (see the module docstring);
    `loaded` is load_eval_data's result when the caller read the records already."""
    from dataclasses import asdict

    from qlocal import preference_run
    from qlocal.data.pref_formats import load_preference
    from qlocal.data.preference import assign_kl, render_preference
    from qlocal.hf import pad_id
    from qlocal.preference_losses import objective_for

    backend = getattr(scorer, "backend", None)
    if backend is None:
        raise UserError(f"{target}: preference pairs are scored by the torch or MLX backend, which switches the "
                        f"adapter off for the reference; eval the run folder instead of its GGUF{_run_of(target)}")
    pref_run = getattr(cfg.train, "method", "sft") != "sft"
    cfg = copy.deepcopy(cfg)
    cfg.train.method = method
    dc = cfg.data = _data_config(cfg, opts.split, pref_run)
    dc.skip_bad_lines = dc.skip_bad_lines or getattr(opts, "skip_bad_lines", False)
    samples, stats = loaded or load_preference(opts.data, method, dc)
    examples, counts = render_preference(samples, scorer.tokenizer, scorer.template, dc.max_seq_len,
                                         dc.train_on_reasoning, dc.drop_long)
    if not examples:
        raise UserError(f"{opts.data}: no record keeps a scored answer on both sides after truncating at "
                        f"data.max_seq_len={dc.max_seq_len}; raise it in the run's config")
    if method == "kto":  # the KL rows' answers, as training pairs its validation examples
        assign_kl(examples, cfg.train.batch_size, dc.max_seq_len)
    collate = preference_run.collate_fn(cfg, pad_id(scorer.tokenizer))
    order = sorted(range(len(examples)), key=lambda i: preference_run.length(examples[i]))
    bs = max(opts.batch_size, 1)
    batches = [collate([examples[j] for j in order[i:i + bs]]) for i in range(0, len(order), bs)]
    objective = objective_for(cfg)
    unit = "examples" if method == "kto" else "pairs"
    report: dict[str, Any] = {
        "target": target, "kind": kind, "backend": scorer.backend_name, "data": opts.data, "task": "preference",
        "method": method, "objective": asdict(objective), "unit": unit, "records": len(samples),
        "format": stats["format"], "unpaired": stats["unpaired"], "skipped": stats["skipped"],
        unit: len(examples), "truncated": counts["truncated"], "dropped_long": counts["dropped_long"],
        "unscored": counts["unscored"],
        "reference": "the base model (adapter off)" if objective.reference else None,
    }
    if kind == "model" and objective.reference:
        report["note"] = (f"{target} has no adapter, so it is its own reference: {method} rewards are 0; "
                          "eval a run folder for the adapter's figures")
    if opts.compare_base:
        if kind == "model":
            raise UserError(f"{target} is a base model already; --compare-base needs a run folder")
        report["base"] = _public(score(backend, batches, objective, base=True))
    report["metrics"] = _public(score(backend, batches, objective, base=not scorer.has_adapter))
    scorer.set_base(not scorer.has_adapter)
    if opts.compare_base:
        report["delta"] = {k: report["metrics"][k] - v for k, v in report["base"].items() if k in report["metrics"]}
    return report


def _run_of(export: str) -> str:
    """': <run folder>' when the export's export.json names the run it came from, else ''."""
    import json
    from pathlib import Path

    path = Path(export)
    try:
        run = json.loads(((path if path.is_dir() else path.parent) / "export.json").read_text(encoding="utf-8"))["run"]
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    return f": {run}" if run else ""


def _public(figures: dict[str, float]) -> dict[str, float]:
    """The report's metrics: the loss, TRL-named metrics, and the objective's own parts (no internals)."""
    return {k: v for k, v in figures.items() if k in METRICS}


def table(report: dict[str, Any]) -> str:
    """The preference figures as a text table: one column, or base / fine-tuned / delta."""
    m, base = report["metrics"], report.get("base")
    name = {"run": "fine-tuned", "model": "model"}.get(report["kind"], report["kind"])
    cols = ["base", name, "delta"] if base is not None else [name]
    params = ", ".join(f"{k}={v}" for k, v in report["objective"].items() if k != "name")
    unit = report["unit"]
    skipped = f", {report['skipped']} malformed skipped" if report.get("skipped") else ""
    head = (f"{report['data']}: {report['records']} records ({report['format']}"
            f"{', unpaired' if report['unpaired'] else ''}{skipped}); {report[unit]} {unit} scored by "
            f"{report['method']} ({params}); reference: {report['reference'] or 'none (reference-free)'}")
    lines = [head, "", f"{'metric':<20}" + "".join(f"{c:>13}" for c in cols)]
    for k in METRICS:
        if k not in m and not (base and k in base):
            continue
        vals = [base.get(k), m.get(k), report["delta"].get(k)] if base is not None else [m.get(k)]
        lines.append(f"{k:<20}" + "".join(f"{'-' if v is None else f'{v:.4f}':>13}" for v in vals))
    notes = [report["note"]] if report.get("note") else []
    if report["truncated"] or report["dropped_long"] or report["unscored"]:
        notes.append(f"{report['truncated']} truncated, {report['dropped_long']} dropped as too long, "
                     f"{report['unscored']} left out with no scored answer token (data.max_seq_len)")
    return "\n".join(lines + [""] * bool(notes) + notes)
