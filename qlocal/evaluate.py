"""`qlocal eval`: loss / perplexity over trained tokens, and generation metrics, for a run, an HF
model or a GGUF; optionally the base model beside it. Preference data (pairs, KTO answers) gets
reward accuracy, margins and the method's loss instead (qlocal.pref_eval).

Loss is counted exactly as training counts it: the same render (template, prompt mask,
max_seq_len) and the same summed next-token cross-entropy over target tokens, through the
training backend itself (torch or MLX) with the run's adapter loaded. Perplexity is
exp(total loss / total target tokens) over the whole file. A GGUF is scored through
llama-cpp-python's logits (logits_all) on ids from the HF tokenizer the export keeps in fused/.
Greedy answers also say whether each ended its turn within --max-tokens (`stops`, qlocal.eval_scorers);
`--compare-quants` runs all this over every GGUF of an export and its run (qlocal.quant_eval).
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from qlocal import atomic
from qlocal.errors import UserError
from qlocal.eval_scorers import BackendScorer, GGUFScorer, stop_metrics
from qlocal.infer import find_gguf, gguf_context_length

LABEL_RULE = ("labels when data.label_map is set, else when there are >= 4 references, each <= 4 tokens, "
              "with 2..min(20, n/2) distinct values")
METRICS = ("loss", "perplexity", "stops", "answer_tokens", "rouge_l", "bleu", "chrf", "exact_match", "accuracy", "macro_precision",
           "macro_recall", "macro_f1", "tool_valid", "tool_valid_json", "tool_name_accuracy", "tool_arguments_exact")
STOPS_NOTE = ("stops: share of answers that ended their turn (eos / end-of-turn token; llama.cpp's EOG set for a "
              "GGUF) within --max-tokens, < 1 means it rambles; answer_tokens: their mean length")
_TOKENS = {"zh": "characters (CJK)", "ja-mecab": "words (MeCab, Japanese)", "13a": "words"}


@dataclass
class EvalOptions:
    """What `qlocal eval` was asked to do."""

    data: str
    generate: bool = True
    max_tokens: int = 128
    limit: int = 100
    """Generate for at most this many records (loss always covers them all)."""
    compare_base: bool = False
    report: Path | None = None
    backend: str | None = None
    config_file: str | None = None
    """A config whose model.chat_template and data mapping apply (HF models and GGUFs; runs use their own)."""
    split: str = "test"
    batch_size: int = 4
    skip_bad_lines: bool = False
    """Skip malformed records (counted) even when the run did not train with data.skip_bad_lines."""


# --------------------------------------------------------------------------------------------


def _data_config(target: Path, config_file: str | None, run_cfg: Any) -> Any:
    """The data section (mapping, prompt masking, max_seq_len) the target trained with."""
    from qlocal import config as config_mod

    if run_cfg is not None:
        if config_file:
            raise UserError(f"{target}: a run evaluates with its own config.yaml (its template and data mapping); drop --config")
        return run_cfg
    if config_file:
        return config_mod.build(config_file)
    summary = target / "export.json" if target.is_dir() else target.parent / "export.json"
    if summary.is_file():  # an export folder: use the mapping of the run it came from, when still there
        run = Path(json.loads(summary.read_text(encoding="utf-8")).get("run", ""))
        if (run / "config.yaml").is_file():
            from qlocal import rundir

            return rundir.load_config(run)[0]
    return config_mod.Config()


def target_config(target: str, opts: EvalOptions) -> Any:
    """The Config whose data section applies to `target`, the target checked on the way (a
    mistyped run, an unfinished one, a model name of no kind) without loading any model."""
    from qlocal import rundir
    from qlocal.infer import check_target

    path = Path(target)
    check_target(target)
    if find_gguf(path) is not None and not (path / "config.yaml").is_file():
        return _data_config(path, opts.config_file, None)
    run_cfg = rundir.load_config(path)[0] if (path / "config.yaml").is_file() else None
    return _data_config(path, opts.config_file, run_cfg)


def open_scorer(target: str, opts: EvalOptions) -> tuple[Any, str, Any]:
    """(scorer, kind, Config whose data section applies) for a run, an HF model or a GGUF."""
    from qlocal.infer import open_backend, resolve_hf_source

    path = Path(target)
    found = find_gguf(path) if path.exists() and not (path / "config.yaml").is_file() else None
    if found is not None:
        found = found[0], found[1] or export_adapter(found[0])
        cfg = _data_config(path, opts.config_file, None)
        ctx = gguf_context_length(found[0]) or 4096
        return GGUFScorer(found[0], found[1], n_ctx=min(ctx, cfg.data.max_seq_len + opts.max_tokens)), "gguf", cfg
    run_cfg = None
    if (path / "config.yaml").is_file():
        from qlocal import rundir

        run_cfg = rundir.load_config(path)[0]
    cfg = _data_config(path, opts.config_file, run_cfg)
    src = resolve_hf_source(target, None if run_cfg is not None else cfg.model.chat_template)
    scorer = BackendScorer(src, open_backend(opts.backend))
    return scorer, "run" if src.adapter is not None else "model", cfg


def export_adapter(gguf: Path) -> Path | None:
    """The adapter.gguf an --adapter-only export applies to `gguf` (one of its base-<quant>.gguf), else None."""
    summary = gguf.parent / "export.json"
    if not summary.is_file():
        return None
    info = json.loads(summary.read_text(encoding="utf-8"))
    adapter = (info.get("adapter") or {}).get("file")
    names = {f.get("file") for f in (info.get("files") or {}).values()}
    return gguf.parent / adapter if adapter and gguf.name in names and (gguf.parent / adapter).is_file() else None


def generation_items(samples: list[Any]) -> list[tuple[Any, list[dict[str, str]], str]]:
    """(sample, prompt messages, reference) for each chat sample: the last assistant turn is the
    reference and everything before it the prompt."""
    items = []
    for s in samples:
        if s.kind != "chat":
            continue
        last = max(i for i, m in enumerate(s.messages) if m["role"] == "assistant")
        items.append((s, s.messages[:last], s.messages[last]["content"]))
    return items


def _score(scorer: Any, examples: list[Any], items: list[Any], opts: EvalOptions, labels: list[str] | None,
           what: str, quiet: bool, tool_prompts: list[Any] | None = None,
           max_len: int | None = None) -> tuple[dict[str, Any], list[str]]:
    from qlocal.metrics_text import text_metrics

    out: dict[str, Any] = {}
    if examples and scorer.tokenizer is not None:
        total, n = scorer.loss(examples, opts.batch_size)
        out = {"loss": total / max(n, 1), "perplexity": math.exp(min(total / max(n, 1), 700.0)), "trained_tokens": n}
    predictions: list[str] = []
    if items:
        from tqdm import tqdm

        finishes = []
        for _, prompt, _ in tqdm(items, desc=f"generate ({what})", unit="rec", disable=quiet, file=sys.stderr):
            text, finish = scorer.answer(prompt, opts.max_tokens)
            predictions.append(text.strip())
            finishes.append(finish)
        out.update(stop_metrics(finishes))  # does it end its turn, or ramble to --max-tokens?
        out.update(text_metrics(predictions, [r for _, _, r in items], labels))
    if tool_prompts:  # calling turns of the data: did the model call the same tools, validly?
        from qlocal.tool_eval import eval_metrics

        out.update(eval_metrics(scorer, tool_prompts, max_len))
    return out, predictions


def evaluate(target: str, opts: EvalOptions, quiet: bool = False) -> dict[str, Any]:
    """Evaluate `target` on opts.data; returns the report (also written to opts.report when set)."""
    from qlocal.data.formats import load_samples
    from qlocal.data.mapping import mapping_from_config
    from qlocal.data.render import render
    from qlocal.metrics_text import bleu_tokenizer, label_set, sources
    from qlocal.tool_eval import prompts_from_samples

    from qlocal.pref_eval import evaluate_preference, load_eval_data, preference_method

    # The target and every data record are checked before any model loads (or converts, or downloads).
    cfg = target_config(target, opts)
    if opts.compare_base and not (Path(target) / "config.yaml").is_file():
        gguf = find_gguf(Path(target)) is not None
        raise UserError(f"{target} is {'a GGUF' if gguf else 'a base model already'}; --compare-base needs a run "
                        "folder (its base is known and the adapter can be switched off)"
                        + ("; eval the base model separately" if gguf else ""))
    method = preference_method(opts.data, opts.split, cfg)
    if method is not None:  # pairs / KTO answers: rewards and the method's loss (qlocal.pref_eval)
        loaded = load_eval_data(cfg, opts, method)
        scorer, kind, cfg = open_scorer(target, opts)
        report = evaluate_preference(scorer, kind, cfg, opts, method, target, loaded)
        scorer.close()
        if opts.report is not None:
            write_report(report, opts.report)
        return report
    dc = cfg.data
    mapping = mapping_from_config(dc)
    # The format is detected per file: the test file may be shaped differently from the training one.
    skip = dc.skip_bad_lines or opts.skip_bad_lines
    samples, stats = load_samples(opts.data, "auto", opts.split, skip_bad_lines=skip, mapping=mapping,
                                  tools=getattr(dc, "tools", None), for_eval=True)
    scorer, kind, cfg = open_scorer(target, opts)
    examples, truncated, dropped = [], 0, 0
    drop_long = getattr(dc, "drop_long", False)  # as training treats examples longer than max_seq_len
    if scorer.tokenizer is not None:
        for s in samples:
            ex = render(s, scorer.tokenizer, scorer.template, dc.train_on_prompt, dc.max_seq_len,
                        train_on_reasoning=getattr(dc, "train_on_reasoning", True))
            if ex.truncated and drop_long:
                dropped += 1
                continue
            truncated += ex.truncated
            if sum(ex.loss_mask[1:]):
                examples.append(ex)
    items = generation_items(samples)[: opts.limit] if opts.generate else []
    tools = prompts_from_samples(samples, opts.limit) if opts.generate and scorer.tokenizer is not None else []
    refs = [r for _, _, r in items]
    labels = label_set(refs, mapping.label_map.values() if mapping and mapping.label_map else None) if refs else None

    report: dict[str, Any] = {
        "target": target, "kind": kind, "backend": scorer.backend_name, "data": opts.data,
        "records": len(samples), "format": stats["format"], "skipped": stats["skipped"], "loss_examples": len(examples),
        "truncated": truncated, "dropped_long": dropped,
        "generation": {"records": len(items), "max_tokens": opts.max_tokens, "sampling": "greedy",
                       "tokens": _TOKENS[bleu_tokenizer(refs)], "labels": labels, "label_rule": LABEL_RULE,
                       # Which library computed each metric, and how (sacrebleu's signatures); also
                       # fails with the missing-extra line here, before any generation.
                       "computed_by": sources(refs, labels)} if items else None,
    }
    if scorer.tokenizer is None:
        report["loss_note"] = "loss needs the HF tokenizer next to the GGUF (an export folder's fused/); not computed"
    base_preds: list[str] = []
    if opts.compare_base:
        if kind == "model":
            raise UserError(f"{target} is a base model already; --compare-base needs a run folder")
        scorer.set_base(True)
        report["base"], base_preds = _score(scorer, examples, items, opts, labels, "base", quiet, tools,
                                            dc.max_seq_len)
        scorer.set_base(False)
    report["metrics"], preds = _score(scorer, examples, items, opts, labels, kind, quiet, tools, dc.max_seq_len)
    scorer.close()  # freed before the caller loads another (eval --compare-quants)
    if opts.compare_base:
        # Scalars only: per_class and confusion_matrix are shown side by side, not subtracted.
        report["delta"] = {k: report["metrics"][k] - v for k, v in report["base"].items()
                           if k in report["metrics"] and k != "trained_tokens" and isinstance(v, (int, float))}
    report["samples"] = [
        {"where": s.where, "reference": r, "prediction": p, **({"base_prediction": base_preds[i]} if base_preds else {})}
        for i, ((s, _, r), p) in enumerate(zip(items, preds))]
    if opts.report is not None:
        write_report(report, opts.report)
    return report


def write_report(report: dict[str, Any], path: Path) -> None:
    """Write the report as JSON, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(path, json.dumps(report, indent=1, ensure_ascii=False))


def _fmt(key: str, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if key in ("bleu", "chrf", "perplexity", "answer_tokens") else f"{value:.4f}"


def _skipped(report: dict[str, Any]) -> str:
    return f", {report['skipped']} malformed skipped" if report.get("skipped") else ""


def table(report: dict[str, Any]) -> str:
    """The metrics as a text table: one column, or base / fine-tuned / delta; for labels, per-class
    precision/recall/F1 and the confusion matrix of each column; then how BLEU/chrF were computed."""
    from qlocal.metrics_text import label_table

    if report.get("task") == "preference":
        from qlocal.pref_eval import table as preference_table

        return preference_table(report)
    m, base = report["metrics"], report.get("base")
    name = {"run": "fine-tuned", "model": "model", "gguf": "gguf"}[report["kind"]]
    cols = ["base", name, "delta"] if base is not None else [name]
    rows = [k for k in METRICS if k in m or (base and k in base)]
    lines = [f"{'metric':<16}" + "".join(f"{c:>13}" for c in cols)]
    for k in rows:
        vals = [base.get(k), m.get(k), report["delta"].get(k)] if base is not None else [m.get(k)]
        lines.append(f"{k:<16}" + "".join(f"{_fmt(k, v):>13}" for v in vals))
    gen = report.get("generation")
    head = (f"{report['data']}: {report['records']} records ({report['format']}{_skipped(report)}); loss over "
            f"{m.get('trained_tokens', 0)} trained tokens in {report['loss_examples']} examples")
    if gen:
        head += f"; generated {gen['records']} (greedy, <= {gen['max_tokens']} tokens, BLEU on {gen['tokens']})"
        if gen["labels"]:
            head += f"; labels: {', '.join(gen['labels'][:8])}"
    for title, col in ([("base", base)] if base is not None else []) + [(name, m)]:
        lines += [""] * bool(col.get("per_class")) + label_table(col, title)
    notes = [report["loss_note"]] if report.get("loss_note") else []
    if "stops" in m:
        notes.append(STOPS_NOTE)
    if m.get("tool_calls"):
        notes.append(f"tool_*: {m['tool_calls']['prompts']} calling turns answered greedily, parsed with tag "
                     f"{m['tool_calls']['tag']!r} as Ollama does (qlocal.tool_eval)")
    how = (gen or {}).get("computed_by", {})
    notes += [f"{label} {how[k]}" for k, label in (("bleu", "BLEU:"), ("chrf", "chrF:")) if k in how]
    return "\n".join([head, ""] + lines + [""] * bool(notes) + notes)


def default_report_path(target: str, data: str) -> Path:
    """<run or export folder>/eval-<data>.json, else ./eval-<target>-<data>.json."""
    path, stem = Path(target), Path(data).stem or "data"
    if path.is_dir() and ((path / "config.yaml").is_file() or (path / "export.json").is_file()):
        return path / f"eval-{stem}.json"
    return Path(f"eval-{path.stem or 'model'}-{stem}.json")


def check_writable(report: Path) -> None:
    """Before any model loads: the report's folder is a folder (or can be made) and takes files."""
    folder = report.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        why = "is not a folder" if not folder.is_dir() else "is not writable"
        raise UserError(f"--report {report}: {folder} {why}; give a report path in a folder you can write")


def run_eval(target: str, opts: EvalOptions, echo: Callable[[str], None] = print, quiet: bool = False) -> dict[str, Any]:
    """The CLI path: evaluate, write the report (default path when none is given), print the table."""
    opts.report = opts.report or default_report_path(target, opts.data)
    check_writable(opts.report)
    report = evaluate(target, opts, quiet=quiet)
    if report.get("kind") == "run":  # the run's trackers (train.report_to) get the report and its metrics
        from qlocal.tracking import log_eval

        log_eval(Path(target), opts.report, report.get("metrics") or {})
    echo(table(report))
    echo(f"report    {opts.report}")
    return report
