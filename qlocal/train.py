"""Run orchestration shared by every backend: data, run folder, schedule, progress, metrics,
checkpoints and resume. The backend only loads the model and takes optimizer steps.

Resume is exact because everything that decides the next step is either restored (adapter,
optimizer, RNG) or a pure function of (seed, step): the learning rate and the data order.
"""

from __future__ import annotations

import gc
import json
import math
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from qlocal import distributed, preference_run, reference, rundir, tracking
from qlocal import hf
from qlocal.backends.base import Backend, Batch, StepStats
from qlocal.config import Config
from qlocal.errors import UserError
from qlocal.objectives import SFT, Objective
from qlocal.preference_losses import objective_for, summarize


@dataclass
class PreparedData:
    train: list[Any]
    val: list[Any]
    format: str
    truncated: int
    template_name: str
    template: str
    dropped: int = 0


def lr_at(step: int, total: int, peak: float, schedule: str, warmup: int) -> float:
    """Learning rate for 0-based optimizer step `step`: linear warmup, then cosine/linear/constant."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant":
        return peak
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return peak * max(0.0, 1.0 - progress)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def prepare_data(cfg: Config, tokenizer: Any, template_choice: str | None) -> PreparedData:
    """Load, normalise and render the training (and validation) data into Examples."""
    from qlocal.data.formats import load_samples
    from qlocal.data.mapping import mapping_from_config
    from qlocal.data.render import render
    from qlocal.data.split import split_validation
    from qlocal.data.templates import resolve_chat_template

    template, template_name = resolve_chat_template(tokenizer, template_choice)
    if preference_run.is_preference(cfg):  # pairs or labelled answers: qlocal.data.preference
        train, val, fmt, truncated, dropped = preference_run.prepare(cfg, tokenizer, template)
        return PreparedData(train, val, fmt, truncated, template_name, template, dropped)
    dc = cfg.data
    mapping = mapping_from_config(dc)  # None unless the config maps another dataset shape
    samples, stats = load_samples(dc.path, dc.format, dc.split, skip_bad_lines=dc.skip_bad_lines, mapping=mapping,
                                  tools=dc.tools)
    if stats.get("skipped") and distributed.from_env().is_main:
        print(f"warning: skipped {stats['skipped']} bad records in {dc.path} "
              f"(first: {', '.join(stats.get('skipped_where', []))})", file=sys.stderr)
    val_samples: list[Any] = []
    if dc.val_path:
        val_samples, _ = load_samples(dc.val_path, dc.format, dc.split, skip_bad_lines=dc.skip_bad_lines,
                                      mapping=mapping, tools=dc.tools)
    else:  # the rule export and eval use to find the held-out records again (qlocal.data.split)
        samples, val_samples = split_validation(samples, dc.val_split, cfg.train.seed)

    def render_all(items: list[Any]) -> list[Any]:
        return [render(s, tokenizer, template, train_on_prompt=dc.train_on_prompt, max_seq_len=dc.max_seq_len,
                       train_on_reasoning=dc.train_on_reasoning) for s in items]

    train, val = render_all(samples), render_all(val_samples)
    dropped = 0
    if dc.drop_long:
        dropped = sum(e.truncated for e in train) + sum(e.truncated for e in val)
        train, val = [e for e in train if not e.truncated], [e for e in val if not e.truncated]
    train = [e for e in train if sum(e.loss_mask[1:]) > 0]
    if not train:
        raise UserError(f"{dc.path}: no example has a trained token left after truncating or dropping at "
                        f"data.max_seq_len={dc.max_seq_len}; raise it")
    truncated = sum(e.truncated for e in train) + sum(e.truncated for e in val)
    if (truncated or dropped) and distributed.from_env().is_main:
        what = f"dropped {dropped}" if dropped else f"truncated {truncated}"
        fix = "" if dropped else " (or --drop-long to leave them out)"
        print(f"warning: {what} examples longer than data.max_seq_len={dc.max_seq_len}; "
              f"raise --max-seq-len to keep them whole{fix}", file=sys.stderr)
    return PreparedData(train, val, stats.get("format", "?"), truncated, template_name, template, dropped)


class _Schedule:
    """Maps optimizer steps to micro-batches: a pure function of (seed, step), so resume can jump."""

    def __init__(self, examples: list[Any], batch_size: int, grad_accum: int, seed: int, pad_id: int,
                 packed: bool, dist: Any = None, collate_fn: Any = None) -> None:
        from qlocal.data.batching import epoch_batches
        from qlocal.distributed import Dist

        self.dist = dist or Dist()
        # With N ranks a micro-batch holds N * batch_size examples and each rank takes its shard.
        self.bs = batch_size * self.dist.world
        self.examples, self.ga, self.seed, self.pad_id = examples, grad_accum, seed, pad_id
        self.packed, self.collate_fn = packed, collate_fn
        """collate_fn: the batching of a preference method's examples; None = SFT's collate."""
        self.lengths = [preference_run.length(e) for e in examples]
        self._epoch_batches = epoch_batches
        self._cache: dict[int, list[list[int]]] = {}
        self.per_epoch = len(epoch_batches(self.lengths, self.bs, seed, 0))

    def _epoch(self, e: int) -> list[list[int]]:
        if e not in self._cache:
            self._cache = {e: self._epoch_batches(self.lengths, self.bs, self.seed, e)}
        return self._cache[e]

    def micro_batches(self, step: int) -> tuple[list[dict[str, np.ndarray]], float]:
        """Collated micro-batches of 0-based optimizer step `step`, and the epoch position reached."""
        from qlocal.data.batching import collate, collate_packed
        from qlocal.distributed import shard

        out = []
        for m in range(step * self.ga, (step + 1) * self.ga):
            e, i = divmod(m, self.per_epoch)
            chosen = shard([self.examples[j] for j in self._epoch(e)[i]], self.dist)
            if self.collate_fn is not None:
                out.append(self.collate_fn(chosen))
            else:
                out.append(collate_packed(chosen) if self.packed else collate(chosen, self.pad_id))
        return out, (step + 1) * self.ga / self.per_epoch


def _default_run_name(model_name: str) -> str:
    short = Path(model_name.rstrip("/")).name.replace("/", "-") or "model"
    return f"{short}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


class _StopFlag:
    """First Ctrl-C (or SIGTERM) asks the loop to checkpoint and stop after the current step."""

    def __init__(self) -> None:
        self.requested = False

    def __enter__(self) -> "_StopFlag":
        self._old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in self._old:
            signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step and saving a checkpoint (Ctrl-C again to abort)", file=sys.stderr)

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def train(cfg: Config, resume: Path | None = None, quiet: bool = False) -> Path:
    """Train a LoRA adapter as configured (or continue `resume`) and return the run folder."""
    from qlocal.backends.select import create_backend, select_backend
    from qlocal.data.templates import add_missing_markers
    from qlocal.export.preflight import preflight
    from qlocal.models import fingerprint, resolve_model

    recorded: dict[str, Any] = {}
    if resume is not None:
        cfg, recorded = rundir.load_config(resume)
    else:
        run = Path(cfg.run.output_dir) / (cfg.run.name or _default_run_name(cfg.model.name))
        rundir.check_available(run, cfg.run.overwrite)
    tracking.check_available(cfg.train.report_to)  # a missing tracker library stops us before any loading
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
    data = prepare_data(cfg, tokenizer, choice)

    tc = cfg.train
    backend = create_backend(backend_name)
    dist = backend.init_distributed()
    pref = preference_run.is_preference(cfg)
    packed = tc.packing and backend.supports_packing and not pref  # pairs are never packed
    collate = preference_run.collate_fn(cfg, pad_id) if pref else None
    sched = _Schedule(data.train, tc.batch_size, tc.grad_accum, tc.seed, pad_id, packed, dist, collate)
    total = tc.iters or max(1, math.ceil(tc.epochs * sched.per_epoch / tc.grad_accum))
    warmup = tc.warmup_steps or int(tc.warmup_ratio * total)

    facts = backend.setup(model.path, cfg)
    resolved = {
        "backend": backend_name, "backend_reason": reason, "model_path": str(model.path),
        "model_source": model.source, "model_fingerprint": model_id, "chat_template": data.template_name,
        "data_format": data.format, "train_examples": len(data.train), "val_examples": len(data.val),
        "total_steps": total, "packing": packed, "truncated_examples": data.truncated,
        "dropped_long": data.dropped, **export, **facts,
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
    try:
        _run_loop(run, plan, backend, resumed=resume is not None, quiet=quiet or not dist.is_main)
    except BaseException:
        # A run that never reached its first checkpoint holds nothing worth resuming.
        if dist.is_main and resume is None and not rundir.checkpoints(run):
            shutil.rmtree(run, ignore_errors=True)
        distributed.shutdown()
        raise
    # DDP's reducer holds the gloo process group; freed after a peer has exited, gloo's destructor
    # can wait forever for it. So free it while every rank is still connected, then leave together.
    del backend
    gc.collect()
    distributed.barrier()
    distributed.shutdown()
    return run


@dataclass
class _Plan:
    """Everything decided before the first step."""

    cfg: Config
    data: PreparedData
    sched: _Schedule
    total: int
    warmup: int
    pad_id: int
    resolved: dict[str, Any]
    objective: Objective


class _Progress:
    """The tqdm bar and what it shows after each step."""

    def __init__(self, total: int, start: int, quiet: bool) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=start, desc="train", unit="step", disable=quiet, dynamic_ncols=True,
                        file=sys.stderr)
        self.last_val: float | None = None

    def advance(self, stats: StepStats, tokens_per_s: float) -> None:
        post = {"loss": f"{stats.loss:.4f}", "tok/s": f"{tokens_per_s:.0f}"}
        for key, short in (("rewards/accuracies", "acc"), ("rewards/margins", "margin")):
            if key in stats.metrics:
                post[short] = f"{stats.metrics[key]:.3f}"
        if self.last_val is not None:
            post["val"] = f"{self.last_val:.4f}"
        self.bar.set_postfix(post)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def _run_loop(run: Path, plan: _Plan, backend: Backend, resumed: bool, quiet: bool) -> Path:
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
        return _steps(run, plan, backend, metrics, start, elapsed_before, quiet)


def _steps(run: Path, plan: _Plan, backend: Backend, metrics: rundir.Metrics, start: int, elapsed_before: float,
           quiet: bool) -> Path:
    """The steps from `start` to the end, then the adapter and loss.png."""
    tc = plan.cfg.train
    main = distributed.current().is_main
    if not quiet:
        _print_header(run, plan.cfg, plan.resolved, plan.data, start)
    val_batches = _validation_batches(plan)
    progress = _Progress(plan.total, start, quiet)
    t_run = time.perf_counter()
    last_saved = start
    with _StopFlag() as stop:
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
                _checkpoint(run, plan, backend, done, elapsed_before + time.perf_counter() - t_run)
                last_saved = done
            if stop.requested:
                progress.close()
                if main:
                    rundir.plot_losses(metrics, run / "loss.png", run.name)
                    print(f"stopped at step {done}/{plan.total}; continue with: qlocal train --resume {run}",
                          file=sys.stderr)
                raise SystemExit(130)
    progress.close()
    if last_saved != plan.total:  # the final step always checkpoints; the adapter must match it
        raise RuntimeError(f"{run}: the last checkpoint is step {last_saved}, not the final step {plan.total}")
    if main:
        rundir.save_dir_atomic(run / "adapter", backend.save_adapter)
        rundir.plot_losses(metrics, run / "loss.png", run.name)
    if not quiet:
        _print_footer(run, metrics)
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


def _step(run: Path, plan: _Plan, backend: Backend, step: int, stop: _StopFlag,
          progress: _Progress) -> tuple[dict[str, Any], StepStats, float]:
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
        float(sum(count_targets(b) for b in micro)), float(stop.requested)])
    tokens, trained = int(tokens), int(trained)
    stop.requested = stop_votes > 0
    record: dict[str, Any] = {
        "step": step + 1, "epoch": round(epoch_pos, 4), "loss": round(stats.loss, 6), "lr": lr,
        "grad_norm": round(stats.grad_norm, 6), "tokens": tokens, "trained_tokens": trained,
        "tokens_per_s": round(tokens / dt, 2), "trained_tokens_per_s": round(trained / dt, 2),
        "peak_memory_mb": round(backend.peak_memory_mb(), 1),
        **{k: round(v, 6) for k, v in stats.metrics.items()},
    }
    return record, stats, dt


def _check_finite(run: Path, stats: StepStats, done: int, lr: float, progress: _Progress) -> None:
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


def _print_header(run: Path, cfg: Config, resolved: dict[str, Any], data: PreparedData, start: int) -> None:
    lines = [
        f"run       {run}" + (f"  (resuming at step {start})" if start else ""),
        f"model     {cfg.model.name}  [{resolved['model_source']}: {resolved['model_path']}]",
        f"backend   {resolved['backend']} on {resolved.get('device', '?')} ({resolved['backend_reason']}), "
        f"dtype {resolved.get('dtype')}, quantize {cfg.train.quantize}",
        f"data      {cfg.data.path}: {len(data.train)} train / {len(data.val)} val examples, format "
        f"{data.format}, template {data.template_name}, {data.truncated} truncated to {cfg.data.max_seq_len}",
        f"lora      rank {cfg.lora.rank}, alpha {cfg.lora.alpha:g}, {resolved.get('trainable_params', 0):,} "
        f"trainable params on {', '.join(resolved.get('target_modules', []))}",
        f"steps     {resolved['total_steps']} x batch {cfg.train.batch_size} x accum {cfg.train.grad_accum}, "
        f"lr {cfg.train.lr:g} {cfg.train.lr_schedule}",
    ]
    print("\n".join(lines), file=sys.stderr)


def _print_footer(run: Path, metrics: rundir.Metrics) -> None:
    rows = metrics.read()
    losses = [r["loss"] for r in rows if "loss" in r]
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    msg = f"done: loss {losses[0]:.4f} -> {losses[-1]:.4f}" if losses else "done"
    if vals:
        msg += f", val loss {vals[-1]:.4f}"
    print(f"{msg}\nadapter   {run / 'adapter'}\nnext      qlocal export {run} --gguf --quant q4_k_m", file=sys.stderr)
