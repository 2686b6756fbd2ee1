"""`qlocal eval export/<run> --data test.jsonl --compare-quants`: which GGUF of an export to ship,
judged on the user's own data against the run it came from.

The run (base + adapter, the reference; read from export.json) and then each GGUF of the export,
largest first, go through the single-target `qlocal eval` (qlocal.evaluate.evaluate) on the same
records: the same renders for loss, the same prompts answered greedily with the same
--max-tokens. So every row is exactly what `qlocal eval <that file>` reports. One model is loaded
at a time and freed before the next (llama.cpp maps the whole file). Rows: size on disk, loss,
perplexity, loss minus the reference's, stops (answers that ended their turn), ROUGE-L against the
data's answers, and agreement with the reference's own answers (ROUGE-L, and the share that are
the very same text).

The recommendation is the smallest file whose loss is within LOSS_TOLERANCE nats/token of the
reference's and whose stops rate is at least the reference's minus STOPS_TOLERANCE (a quant that
tips the end-of-turn token and rambles in Ollama fails the second even when its loss is close).
With the run gone, the reference is the largest GGUF, said in the notes.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Callable

from qlocal import atomic
from qlocal.errors import UserError

LOSS_TOLERANCE = 0.05
"""nats/token over the reference's loss: perplexity at most ~5% higher (exp(0.05) = 1.051)."""
STOPS_TOLERANCE = 0.05
"""The stops rate may be this much below the reference's (1 answer in 20)."""
DEFAULT_LIMIT = 50
"""Records generated per model (N GGUFs + the run: N + 1 passes); loss covers every record."""
RULE = (f"loss within {LOSS_TOLERANCE} nats/token of the reference's (perplexity +{math.expm1(LOSS_TOLERANCE):.1%}) "
        f"and stops >= the reference's - {STOPS_TOLERANCE}")


@dataclasses.dataclass
class ExportFiles:
    """What --compare-quants evaluates in an export folder."""

    run: Path | None
    """The run folder export.json names, when it is still there (else None: see notes)."""
    ggufs: list[tuple[str, Path]]
    """(quant, file) for each model GGUF export.json lists, largest first."""
    adapter_bytes: int
    """Size of the GGUF LoRA every file is served with (--adapter-only exports), else 0."""
    notes: list[str]


def export_files(target: str) -> ExportFiles:
    """The run and GGUFs of the export folder `target`; a one-line UserError for anything else."""
    from qlocal import rundir

    path = Path(target)
    rundir.check_exists(target)
    how = "make one with qlocal export outputs/<run> --quant q8_0,q4_k_m"
    if (path / "config.yaml").is_file():
        raise UserError(f"{target}: a run folder; --compare-quants takes the export folder of it ({how})")
    if path.is_file():
        raise UserError(f"{target}: a file; --compare-quants takes the export folder that holds the GGUFs ({how})")
    summary = path / "export.json"
    if not summary.is_file():
        raise UserError(f"{target}: not an export folder (no export.json); --compare-quants takes one ({how})")
    try:
        info = json.loads(summary.read_text(encoding="utf-8"))
        listed = [(q, path / f["file"]) for q, f in (info.get("files") or {}).items()]
    except (ValueError, TypeError, KeyError, AttributeError):
        raise UserError(f"{summary}: not an export summary qlocal wrote; export the run again") from None
    ggufs = [(q, p) for q, p in listed if p.is_file()]
    notes = [f"{p.name} is listed in export.json but missing: skipped" for _, p in listed if not p.is_file()]
    if not ggufs:
        raise UserError(f"{target}: no GGUF of export.json is there; export again with --gguf ({how})")
    ggufs.sort(key=lambda qp: -qp[1].stat().st_size)
    adapter = (info.get("adapter") or {}).get("file")
    adapter_bytes = (path / adapter).stat().st_size if adapter and (path / adapter).is_file() else 0
    if adapter_bytes:
        notes.append(f"--adapter-only export: each base GGUF is evaluated with {adapter} applied; sizes include it")
    run = Path(info.get("run") or "")
    why = None if (run / "config.yaml").is_file() else f"the run {run} is gone"
    if why is None:
        from qlocal.infer import check_target

        try:
            check_target(str(run))  # its base model still there, training finished
        except UserError as e:
            why = str(e)
    if why is not None:
        notes.append(f"{why}: the reference is the largest GGUF, {ggufs[0][1].name}")
        return ExportFiles(None, ggufs, adapter_bytes, notes)
    return ExportFiles(run, ggufs, adapter_bytes, notes)


def _agreement(predictions: list[str], reference: list[str]) -> tuple[float | None, float | None]:
    """(mean ROUGE-L, share identical) of answers against the reference model's; identical texts
    count 1.0 (rouge-score gives two empty answers 0)."""
    from qlocal.metrics_text import rouge_l

    if not reference:
        return None, None
    pairs = list(zip(predictions, reference))
    same = [p == r for p, r in pairs]
    rl = [1.0 if s else rouge_l(p, r) for s, (p, r) in zip(same, pairs)]
    return sum(rl) / len(pairs), sum(same) / len(pairs)


def _row(name: str, quant: str | None, size: int | None, report: dict[str, Any]) -> dict[str, Any]:
    m = report.get("metrics") or {}
    return {"target": name, "quant": quant, "bytes": size, "loss": m.get("loss"), "perplexity": m.get("perplexity"),
            "stops": m.get("stops"), "answer_tokens": m.get("answer_tokens"), "rouge_l": m.get("rouge_l"),
            "eval": report}


def recommend(rows: list[dict[str, Any]], reference: dict[str, Any]) -> dict[str, Any]:
    """The smallest GGUF row (those with `bytes`) that meets RULE against `reference`, and one line
    saying it, or saying that none does and what to try. Rows carry loss, delta_loss, stops, bytes."""
    ref_stops = reference.get("stops")
    candidates = [r for r in rows if r.get("bytes") is not None]
    if reference.get("loss") is None:
        return {"file": None, "line": f"no recommendation: {reference['target']} has no loss to compare with "
                                      "(the HF tokenizer in the export's fused/ is needed)"}

    def loss_ok(r: dict[str, Any]) -> bool:
        return r.get("delta_loss") is not None and r["delta_loss"] <= LOSS_TOLERANCE

    def stops_ok(r: dict[str, Any]) -> bool:
        return ref_stops is None or (r.get("stops") is not None and r["stops"] >= ref_stops - STOPS_TOLERANCE)

    rule = RULE + ("" if ref_stops is not None else " (stops not compared: nothing was generated)")
    good = [r for r in candidates if loss_ok(r) and stops_ok(r)]
    if good:
        best = min(good, key=lambda r: r["bytes"])
        stops = "" if ref_stops is None else f", stops {best['stops']:.2f} vs {ref_stops:.2f}"
        return {"file": best["target"], "line": (f"recommended: {best['target']} ({_size(best['bytes'])}), the smallest "
                                                 f"file with {rule} (loss {best['delta_loss']:+.4f}{stops})")}
    if not candidates:
        return {"file": None, "line": "no recommendation: no GGUF was evaluated"}
    largest = max(candidates, key=lambda r: r["bytes"])
    if not loss_ok(largest):
        fix = (f"even the largest, {largest['target']}, is {largest['delta_loss']:+.4f} nats/token off: export a "
               "16-bit file (--quant f16) and check verify.json" if largest.get("delta_loss") is not None
               else "no file has a loss (the export's fused/ tokenizer is needed)")
    elif not any(stops_ok(r) for r in candidates):
        fix = ("the files end their turn less often than the reference: try a larger --quant (q8_0, f16), or train "
               "longer so the end of turn is learned with a wider margin")
    else:
        fix = "try a larger --quant (q6_k, q8_0) for a smaller file than the ones that are close, or train longer"
    return {"file": None, "line": f"no file meets {rule}: {fix}"}


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def compare_quants(target: str, opts: Any, quiet: bool = False) -> dict[str, Any]:
    """Evaluate the export's run and each of its GGUFs on opts.data (EvalOptions); the report."""
    from qlocal.evaluate import evaluate, target_config
    from qlocal.pref_eval import preference_method

    found = export_files(target)
    if opts.compare_base:
        raise UserError("--compare-quants compares the GGUFs with the run; --compare-base is a separate "
                        "`qlocal eval outputs/<run> --compare-base`")
    cfg = target_config(str(found.ggufs[0][1]), opts)  # the run's data mapping, the data file checked
    if preference_method(opts.data, opts.split, cfg) is not None:
        raise UserError(f"{opts.data}: preference data; --compare-quants scores answers (loss, stops, ROUGE-L) on "
                        "chats or prompt/completion records")
    sub = dataclasses.replace(opts, report=None)
    rows: list[dict[str, Any]] = []
    if found.run is not None:
        rows.append(_row(f"run {found.run.name}", None, None, evaluate(str(found.run), sub, quiet=quiet)))
    for quant, path in found.ggufs:
        rows.append(_row(path.name, quant, path.stat().st_size + found.adapter_bytes,
                         evaluate(str(path), sub, quiet=quiet)))
    reference = rows[0]
    ref_answers = [s["prediction"] for s in reference["eval"].get("samples", [])]
    for r in rows:
        r["delta_loss"] = None if r["loss"] is None or reference["loss"] is None else r["loss"] - reference["loss"]
        answers = [s["prediction"] for s in r["eval"].get("samples", [])]
        r["agree_rouge_l"], r["agree_same"] = _agreement(answers, ref_answers) if r is not reference else (None, None)
    gen = reference["eval"].get("generation") or {}
    report = {"task": "compare_quants", "target": target, "data": opts.data, "reference": reference["target"],
              "records": reference["eval"].get("records"), "generated": gen.get("records", 0),
              "max_tokens": opts.max_tokens, "rule": RULE,
              "tolerance": {"loss_nats_per_token": LOSS_TOLERANCE, "stops": STOPS_TOLERANCE},
              "notes": found.notes, "rows": rows}
    report["recommendation"] = recommend(rows[1:] if found.run is not None else rows, reference)
    return report


def table(report: dict[str, Any]) -> str:
    """The comparison as text: one row per model, then the notes and the recommendation."""
    from qlocal.evaluate import STOPS_NOTE

    def num(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    cols = ("target", "size", "loss", "ppl", "dloss", "stops", "tokens", "rouge_l", "agree", "same")
    width = max([len(r["target"]) for r in report["rows"]] + [6])
    lines = [f"{cols[0]:<{width}}" + "".join(f"{c:>10}" for c in cols[1:])]
    for r in report["rows"]:
        cells = (_size(r["bytes"]), num(r["loss"], ".4f"), num(r["perplexity"], ".3f"), num(r["delta_loss"], "+.4f"),
                 num(r["stops"], ".2f"), num(r["answer_tokens"], ".1f"), num(r["rouge_l"], ".4f"),
                 num(r["agree_rouge_l"], ".4f"), num(r["agree_same"], ".2f"))
        lines.append(f"{r['target']:<{width}}" + "".join(f"{c:>10}" for c in cells))
    head = (f"{report['data']}: {report['records']} records; loss over all of them, {report['generated']} answered "
            f"greedily (<= {report['max_tokens']} tokens) by each model; reference: {report['reference']}")
    how = ["dloss: loss - the reference's (nats/token); tokens: answer_tokens; rouge_l: vs the data's answers; "
           "agree / same: ROUGE-L vs the reference's own answers / share identical", STOPS_NOTE]
    return "\n".join([head, ""] + lines + [""] + how + [f"note: {n}" for n in report["notes"]]
                     + ["", report["recommendation"]["line"]])


def run_compare(target: str, opts: Any, echo: Callable[[str], None] = print, quiet: bool = False) -> dict[str, Any]:
    """The CLI path: compare, write the report (default <export>/eval-<data>-quants.json), print the table."""
    from qlocal.evaluate import check_writable

    export_files(target)  # a wrong target is named before the report path is looked at
    opts.report = opts.report or Path(target) / f"eval-{Path(opts.data).stem or 'data'}-quants.json"
    check_writable(opts.report)
    report = compare_quants(target, opts, quiet=quiet)
    opts.report.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(opts.report, json.dumps(report, indent=1, ensure_ascii=False))
    echo(table(report))
    echo(f"report    {opts.report}")
    return report
