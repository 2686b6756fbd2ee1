"""Run orchestration shared by every backend: run folder, plan, the step loop with validation,
metrics and checkpoints, and resume. The backend only loads the model and takes optimizer steps;
data preparation is qlocal.train_data, the schedule qlocal.train_schedule, the display
qlocal.progress, the Ctrl-C flag qlocal.stop_flag.

Resume is exact because everything that decides the next step is either restored (adapter,
optimizer, RNG) or a pure function of (seed, step): the learning rate and the data order.
"""

from __future__ import annotations

import gc
import json
import math
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from qlocal import distributed, pidfile, preference_run, reference, rundir, tracking
from qlocal import hf
from qlocal.backends.base import Backend, Batch, StepStats
from qlocal.config import Config
from qlocal.errors import UserError
from qlocal.objectives import SFT, Objective
from qlocal.preference_losses import objective_for, summarize
from qlocal.progress import Progress, print_footer, print_header
from qlocal.stop_flag import StopFlag
from qlocal.train_data import PreparedData, load_data, prepare_data
from qlocal.train_schedule import Schedule, lr_at


def _default_run_name(model_name: str) -> str:
    short = Path(model_name.rstrip("/")).name.replace("/", "-") or "model"
    return f"{short}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def train(cfg: Config, resume: Path | None = None, quiet: bool = False) -> Path:
    """Train a LoRA adapter as configured (or continue `resume`) and return the run folder."""
    from qlocal.backends.select import create_backend, select_backend
    from qlocal.data.templates import add_missing_markers
    from qlocal.export.preflight import preflight
    from qlocal.models import check_model_name, fingerprint, resolve_model

    recorded: dict[str, Any] = {}
    if resume is not None:
        cfg, recorded = rundir.load_config(resume)
    else:
        run = Path(cfg.run.output_dir) / (cfg.run.name or _default_run_name(cfg.model.name))
        rundir.check_available(run, cfg.run.overwrite)
    # Every cheap check before any slow work (an alias's conversion, a download, a model load):
    # the trackers, the model name, every data record, then the backend.
    tracking.check_available(cfg.train.report_to, resume)  # a missing library or server stops us before any loading
    check_model_name(cfg.model.name, allow_pickle=cfg.model.allow_pickle)
    loaded = load_data(cfg)
    backend_name, reason = select_backend(cfg.train.backend)
    model = resolve_model(cfg.model.name, cfg.model.revision, allow_pickle=cfg.model.allow_pickle)
    model_id = fingerprint(model.path)
    if resume is not None and recorded.get("model_fingerprint") not in (None, model_id):
        raise UserError(f"{resume}: was trained on a different base model than {model.path} is now "
                        f"(fingerprint {recorded['model_fingerprint']} vs {model_id}); resume needs the same base")
    export = preflight(model.path, cfg.model.name, cfg.model.require_export, distributed.from_env().is_main)
    tokenizer = hf.load_tokenizer(model.path, cfg.model.trust_remote_code, cfg.lora.new_tokens)
    pad_id = hf.pad_id(tokenizer)
    choice = cfg.model.chat_template or model.default_chat_template
    added, line = add_missing_markers(tokenizer, choice)  # before rendering: markers become one token
    cfg.lora.new_tokens = [*cfg.lora.new_tokens, *added]
    if line and distributed.from_env().is_main:
        print(line, file=sys.stderr)
    data = prepare_data(cfg, tokenizer, choice, loaded)

    tc = cfg.train
    backend = create_backend(backend_name)
    dist = backend.init_distributed()
    pref = preference_run.is_preference(cfg)
    packed = tc.packing and backend.supports_packing and not pref  # pairs are never packed
    collate = preference_run.collate_fn(cfg, pad_id) if pref else None
    sched = Schedule(data.train, tc.batch_size, tc.grad_accum, tc.seed, pad_id, packed, dist, collate)
    total = tc.iters or max(1, math.ceil(tc.epochs * sched.per_epoch / tc.grad_accum))
    warmup = tc.warmup_steps or int(tc.warmup_ratio * total)

    facts = backend.setup(model.path, cfg)
    resolved = {
        "backend": backend_name, "backend_reason": reason, "model_path": str(model.path),
        "model_source": model.source, "model_fingerprint": model_id, "chat_template": data.template_name,
        "data_format": data.format, "train_examples": len(data.train), "val_examples": len(data.val),
        "total_steps": total, "packing": packed, "truncated_examples": data.truncated,
        "dropped_long": data.dropped, "data_reasoning": _reasons(loaded.train), **export, **facts,
    }
    if collate is not None:
        preference_run.precompute_reference(backend, cfg, data.train + data.val, collate, quiet or not dist.is_main)
    objective = objective_for(cfg) if pref else SFT()
    plan = _Plan(cfg, data, sched, total, warmup, pad_id, resolved, objective)
    if resume is not None:
        run = resume
    elif dist.is_main:
        rundir.create(run, cfg.run.overwrite)
    distributed.barrier()
    # From here to the end of teardown a Ctrl-C is the flag's (qlocal.stop_flag), never a bare
    # KeyboardInterrupt between the last step and the final save; train.pid tells the studio we run.
    with StopFlag(shared=dist.enabled) as stop, pidfile.holding(run) if dist.is_main else nullcontext():
        try:
            _run_loop(run, plan, backend, stop, resumed=resume is not None, quiet=quiet or not dist.is_main)
            # DDP's reducer holds the gloo process group; freed after a peer has exited, gloo's destructor
            # can wait forever for it. So free it while every rank is still connected, then leave together.
            del backend
            gc.collect()
            distributed.barrier()
            distributed.shutdown()
        except BaseException as e:
            _interrupted(run, dist.is_main and resume is None, dist.is_main and isinstance(e, KeyboardInterrupt))
            distributed.shutdown()
            if isinstance(e, KeyboardInterrupt):
                raise SystemExit(130) from None
            raise
    if stop.pending:  # Ctrl-C after the last step: the final save was let finish
        if dist.is_main:
            print(f"stopped after the last step; the run is complete: {run / 'adapter'}", file=sys.stderr)
        raise SystemExit(130)
    return run


def _reasons(samples: list[Any]) -> bool:
    """Whether any training chat reasons: inference sets a template's thinking switch (Qwen3's
    enable_thinking) as training did, so a run trained without reasoning gets its empty block as prompt."""
    return any(isinstance(m, dict) and m.get("reasoning_content") for s in samples for m in getattr(s, "messages", None) or [])


def _interrupted(run: Path, may_remove: bool, say: bool) -> None:
    """After a run ended early: remove a fresh run folder that holds nothing to resume or use (no
    checkpoint, no adapter), and for an abort (second Ctrl-C) say in one line what is left."""
    ckpts = rundir.checkpoints(run)
    adapter = (run / "adapter" / "adapter_config.json").is_file()
    removed = may_remove and not ckpts and not adapter
    if removed:
        shutil.rmtree(run, ignore_errors=True)
    if not say:
        return
    if adapter:
        line = f"aborted after the adapter was saved: {run / 'adapter'} is complete"
    elif ckpts:
        line = f"aborted; the last checkpoint is step {ckpts[-1][0]}; continue with: qlocal train --resume {run}"
    else:
        line = f"aborted before the first checkpoint; {run} " + ("removed" if removed else "has nothing to resume")
    print(f"\n{line}", file=sys.stderr)


@dataclass
class _Plan:
    """Everything decided before the first step."""

    cfg: Config
    data: PreparedData
    sched: Schedule
    total: int
    warmup: int
    pad_id: int
    resolved: dict[str, Any]
    objective: Objective


def _run_loop(run: Path, plan: _Plan, backend: Backend, stop: StopFlag, resumed: bool, quiet: bool) -> Path:
    """Optimizer steps from the resume point to the end, then the adapter; Ctrl-C saves and exits 130."""
    main = distributed.current().is_main
    start, elapsed_before = _resume_point(run, backend, resumed)
    if main:
        rundir.save_config_with_template(run, plan.cfg, plan.resolved, plan.data.template)
    metrics = rundir.Metrics(run / "metrics.jsonl", resume_step=start if resumed and main else None)
    # Rank 0's trackers get every line metrics.jsonl gets (qlocal.tracking); closed with the run's outcome.
    trackers = (tracking.start(run, plan.cfg, plan.resolved, start if resumed else None, metrics.logged_through)
                if main else tracking.Trackers())
    metrics.on_write = trackers.log
    with trackers.session(run):
        return _steps(run, plan, backend, stop, metrics, start, elapsed_before, quiet)


def _steps(run: Path, plan: _Plan, backend: Backend, stop: StopFlag, metrics: rundir.Metrics, start: int,
           elapsed_before: float, quiet: bool) -> Path:
    """The steps from `start` to the end, then the adapter and loss.png. A stop requested at the
    last step (or after it) lets that save finish: train() then exits 130."""
    tc = plan.cfg.train
    main = distributed.current().is_main
    if not quiet:
        print_header(run, plan.cfg, plan.resolved, plan.data, start)
    val_batches = _validation_batches(plan)
    progress = Progress(plan.total, start, quiet)
    t_run = time.perf_counter()
    last_saved = start
    try:
        for step in range(start, plan.total):
            done = step + 1
            record, stats, dt = _step(run, plan, backend, step, stop, progress)
            if val_batches and (done % tc.eval_every == 0 or done == plan.total):
                s, n = backend.eval_loss(reference.complete(backend, val_batches, plan.objective), plan.objective)
                if n:  # truncation can leave the validation examples no trained token: no loss, not 0.0
                    progress.last_val = record["val_loss"] = round(s / n, 6)
            if main and (done % tc.log_every == 0 or done == plan.total or "val_loss" in record):
                metrics.write(record)
            progress.advance(stats, record["tokens"] / dt)
            if done % tc.save_every == 0 or done == plan.total or stop.requested:
                with stop.saving():
                    _checkpoint(run, plan, backend, done, elapsed_before + time.perf_counter() - t_run)
                last_saved = done
            if stop.requested and done < plan.total:
                progress.close()
                if main:
                    rundir.plot_losses(metrics, run / "loss.png", run.name)
                    print(f"stopped at step {done}/{plan.total}; continue with: qlocal train --resume {run}",
                          file=sys.stderr)
                raise SystemExit(130)
    except BaseException:
        progress.close()  # the bar's last redraw before the closing line, not after it
        raise
    stop.after_steps = True
    progress.close()
    if last_saved != plan.total:  # the final step always checkpoints; the adapter must match it
        raise RuntimeError(f"{run}: the last checkpoint is step {last_saved}, not the final step {plan.total}")
    if main:
        with stop.saving():
            rundir.save_dir_atomic(run / "adapter", backend.save_adapter)
        rundir.plot_losses(metrics, run / "loss.png", run.name)
    if not quiet and not stop.pending:  # stopped: train() ends with its one line instead
        print_footer(run, metrics)
    return run


def _resume_point(run: Path, backend: Backend, resumed: bool) -> tuple[int, float]:
    """(steps done, seconds trained) of the last checkpoint, its state loaded into the backend; (0, 0) when fresh."""
    ckpts = rundir.checkpoints(run)
    if not (resumed and ckpts):
        return 0, 0.0
    step_done, ckpt = ckpts[-1]
    backend.load_state(ckpt)
    state = json.loads((ckpt / "state.json").read_text())
    return step_done, state.get("elapsed_s", 0.0)


def _validation_batches(plan: _Plan) -> list[Batch]:
    """The validation set as this rank's share of fixed, length-bucketed batches (same every eval)."""
    if not plan.data.val:
        return []
    from qlocal.data.batching import collate, epoch_batches

    val = plan.data.val
    lengths = [preference_run.length(e) for e in val]
    batch = plan.sched.collate_fn or (lambda items: collate(items, plan.pad_id))
    return [batch(distributed.shard([val[j] for j in b], plan.sched.dist))
            for b in epoch_batches(lengths, plan.sched.bs, 0, 0)]


def _step(run: Path, plan: _Plan, backend: Backend, step: int, stop: StopFlag,
          progress: Progress) -> tuple[dict[str, Any], StepStats, float]:
    """Optimizer step `step` (0-based): its metrics record (counted over all ranks), stats, seconds.

    Every rank votes on a pending Ctrl-C here, so all of them stop after the same step.
    """
    from qlocal.data.batching import count_targets

    tc = plan.cfg.train
    micro, epoch_pos = plan.sched.micro_batches(step)
    lr = lr_at(step, plan.total, tc.lr, tc.lr_schedule, plan.warmup)
    t0 = time.perf_counter()
    # Reference scores (base = adapter off) and KTO's KL estimate: part of the step's cost.
    stats = backend.train_step(reference.complete(backend, micro, plan.objective), lr, plan.objective)
    stats.metrics = summarize(plan.objective, stats.metrics)
    dt = max(time.perf_counter() - t0, 1e-9)
    _check_finite(run, stats, step + 1, tc.lr, progress)
    tokens, trained, stop_votes = distributed.all_sum([
        float(sum(int(b["attention_mask"].sum()) for b in micro)),
        float(sum(count_targets(b) for b in micro)), float(stop.pending)])
    tokens, trained = int(tokens), int(trained)
    stop.vote(stop_votes)  # never undoes a Ctrl-C that landed after `pending` was read: it counts next step
    record: dict[str, Any] = {
        "step": step + 1, "epoch": round(epoch_pos, 4), "loss": round(stats.loss, 6), "lr": lr,
        "grad_norm": round(stats.grad_norm, 6), "tokens": tokens, "trained_tokens": trained,
        "tokens_per_s": round(tokens / dt, 2), "trained_tokens_per_s": round(trained / dt, 2),
        "peak_memory_mb": round(backend.peak_memory_mb(), 1),
        **{k: round(v, 6) for k, v in stats.metrics.items()},
    }
    return record, stats, dt


def _check_finite(run: Path, stats: StepStats, done: int, lr: float, progress: Progress) -> None:
    """Stop the run at a NaN/inf loss or gradient (the backend skipped that update), naming the fix."""
    if math.isfinite(stats.loss) and math.isfinite(stats.grad_norm):
        return
    progress.close()
    ckpts = rundir.checkpoints(run)
    kept = f"; the last good checkpoint is {ckpts[-1][1]}" if ckpts else ""
    bad = stats.loss if not math.isfinite(stats.loss) else f"finite but its gradient {stats.grad_norm}"
    raise UserError(f"loss became {bad} at step {done}; lower the learning rate "
                    f"(now train.lr={lr}, try {lr / 4:g}){kept}")


def _checkpoint(run: Path, plan: _Plan, backend: Backend, done: int, elapsed: float) -> None:
    """Save checkpoint `done`: every rank joins the state gather (FSDP), rank 0 writes, all wait."""
    backend.gather_state()
    if distributed.current().is_main:
        rundir.save_checkpoint(run, done, {"step": done, "total_steps": plan.total, "elapsed_s": elapsed},
                               backend, plan.cfg.train.keep_last)
    distributed.barrier()
