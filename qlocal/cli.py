"""qlocal command line. Each command resolves its config and makes one call; heavy libraries are
imported inside those calls so `qlocal --help` stays instant."""

from __future__ import annotations

import errno
import sys
from pathlib import Path
from typing import Any

import click

from qlocal.chat_families import fallbacks
from qlocal.errors import UserError

# Named fallback templates, from the chat-family table (a light leaf module).
TEMPLATE_NAMES = "|".join(fallbacks())

# CLI flag -> config key. Flags left unset (None) do not override the YAML file or defaults.
TRAIN_FLAGS: dict[str, str] = {
    "model": "model.name", "revision": "model.revision", "chat_template": "model.chat_template",
    "trust_remote_code": "model.trust_remote_code",
    "data": "data.path", "val_data": "data.val_path", "val_split": "data.val_split", "split": "data.split",
    "data_format": "data.format", "max_seq_len": "data.max_seq_len", "train_on_prompt": "data.train_on_prompt",
    "skip_bad_lines": "data.skip_bad_lines", "drop_long": "data.drop_long", "allow_pickle": "model.allow_pickle",
    "require_export": "model.require_export",
    "rank": "lora.rank", "alpha": "lora.alpha", "dropout": "lora.dropout",
    "target_modules": "lora.target_modules", "layers": "lora.layers",
    "method": "train.method", "backend": "train.backend", "quantize": "train.quantize", "iters": "train.iters", "epochs": "train.epochs",
    "batch_size": "train.batch_size", "grad_accum": "train.grad_accum", "lr": "train.lr",
    "lr_schedule": "train.lr_schedule", "warmup": "train.warmup_steps", "warmup_ratio": "train.warmup_ratio",
    "weight_decay": "train.weight_decay", "max_grad_norm": "train.max_grad_norm",
    "grad_checkpointing": "train.grad_checkpointing", "dtype": "train.dtype", "seed": "train.seed",
    "eval_every": "train.eval_every", "save_every": "train.save_every", "keep_last": "train.keep_last",
    "report_to": "train.report_to",
    "output_dir": "run.output_dir", "name": "run.name", "overwrite": "run.overwrite",
}


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="qlocal")
def cli() -> None:
    """Fine-tune an open LLM with LoRA/QLoRA on this machine and export it for Ollama / llama.cpp.

    \b
      qlocal data check data/alpaca_sample.jsonl --model gemma-3-270m
      qlocal train --model gemma-3-270m --data data/alpaca_sample.jsonl   # writes outputs/<run>
      qlocal chat outputs/<run>
      qlocal export outputs/<run> --quant q4_k_m                         # writes export/<run>
      ollama create my-model -f export/<run>/Modelfile
      qlocal doctor                                                      # what this machine can run

    `qlocal COMMAND --help` shows each command's options and defaults.
    """


def _opt(*names: str, **kw: Any) -> Any:
    kw.setdefault("default", None)
    return click.option(*names, **kw)


@cli.command(context_settings={"show_default": False}, short_help="Fine-tune a LoRA/QLoRA adapter into outputs/<run>.")
@_opt("--config", "config_file", type=click.Path(dir_okay=False), help="YAML config file (sections model/data/lora/train/run).")
@_opt("--set", "sets", multiple=True, default=(), metavar="KEY=VALUE", help="Override any config key, e.g. --set lora.rank=16. Repeatable.")
@_opt("--resume", type=click.Path(file_okay=False), metavar="RUN_DIR", help="Continue a stopped run from its last checkpoint (its saved config is used).")
@_opt("--model", "-m", help="Base model: local HF folder, hub id or alias. [default: gemma-3-270m]")
@_opt("--revision", help="Hub revision of --model.")
@_opt("--data", "-d", help="Training data: .jsonl/.json/.csv/.parquet or a datasets hub id.")
@_opt("--val-data", help="Validation data file.")
@_opt("--val-split", type=float, help="Fraction of training records held out for validation.")
@_opt("--split", help="Split of a hub dataset. [default: train]")
@_opt("--format", "data_format", type=click.Choice(["auto", "alpaca", "sharegpt", "messages", "completion", "text", "pairs", "pairs_implicit", "kto"]), help="Data format. [default: auto]")
@_opt("--chat-template", help=f"{TEMPLATE_NAMES} or a .jinja file. [default: the model's own]")
@_opt("--train-on-prompt/--no-train-on-prompt", default=None, help="Also train on prompt tokens.")
@_opt("--max-seq-len", type=int, help="Truncate examples to this many tokens. [default: 1024]")
@_opt("--skip-bad-lines", is_flag=True, default=None, help="Skip malformed records (counted) instead of stopping.")
@_opt("--drop-long", is_flag=True, default=None, help="Drop examples longer than --max-seq-len instead of truncating.")
@_opt("--method", type=click.Choice(["sft", "dpo", "orpo", "kto", "simpo"]), help="Objective: sft, or a preference method on pairs/labelled data (config section preference). [default: sft]")
@_opt("--backend", "-b", type=click.Choice(["auto", "torch", "mlx"]), help="Training backend. [default: auto]")
@_opt("--quantize", "-q", type=click.Choice(["none", "4bit", "8bit"]), help="Quantise the base: 4bit = QLoRA. [default: none]")
@_opt("--rank", "-r", type=int, help="LoRA rank. [default: 8]")
@_opt("--alpha", type=float, help="LoRA alpha (scale = alpha/rank). [default: 16]")
@_opt("--dropout", type=float, help="LoRA dropout. [default: 0]")
@_opt("--target-modules", help="Comma-separated module names, or all-linear. [default: all-linear]")
@_opt("--layers", type=int, help="Adapt only the last N layers. [default: all]")
@_opt("--lr", type=float, help="Peak learning rate. [default: 2e-4]")
@_opt("--lr-schedule", type=click.Choice(["cosine", "linear", "constant"]), help="[default: cosine]")
@_opt("--warmup", type=int, help="Warmup steps. [default: 0]")
@_opt("--warmup-ratio", type=float, help="Warmup as a fraction of the steps.")
@_opt("--weight-decay", type=float, help="AdamW weight decay. [default: 0]")
@_opt("--max-grad-norm", type=float, help="Clip gradients to this norm, 0 = off. [default: 1.0]")
@_opt("--iters", type=int, help="Optimizer steps (overrides --epochs).")
@_opt("--epochs", type=float, help="Passes over the data. [default: 1]")
@_opt("--batch-size", type=int, help="Examples per micro-batch. [default: 4]")
@_opt("--grad-accum", type=int, help="Micro-batches per optimizer step. [default: 1]")
@_opt("--grad-checkpointing/--no-grad-checkpointing", default=None, help="Recompute activations to save memory.")
@_opt("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), help="[default: auto]")
@_opt("--seed", type=int, help="[default: 0]")
@_opt("--eval-every", type=int, help="Validate every N steps. [default: 50]")
@_opt("--save-every", type=int, help="Checkpoint every N steps. [default: 100]")
@_opt("--keep-last", type=int, help="Checkpoints kept. [default: 2]")
@_opt("--report-to", metavar="TRACKERS", help="Also log to tensorboard, wandb and/or mlflow (comma-separated). [default: none]")
@_opt("--output-dir", "-o", help="Folder for run folders. [default: outputs]")
@_opt("--name", help="Run folder name. [default: <model>-<date>-<time>]")
@_opt("--overwrite", is_flag=True, default=None, help="Replace an existing run folder of that name.")
@_opt("--trust-remote-code", is_flag=True, default=None, help="Allow model code from the hub to run.")
@_opt("--allow-pickle", is_flag=True, default=None, help="Accept pickle .bin weights (they can run code).")
@_opt("--require-export", is_flag=True, default=None, help="Stop before training (exit 2) when the model will not export to GGUF; otherwise a warning.")
@_opt("--quiet", is_flag=True, default=False, help="No header or progress bar.")
def train(config_file: str | None, sets: tuple[str, ...], resume: str | None, quiet: bool, **flags: Any) -> None:
    """Fine-tune a LoRA/QLoRA adapter; writes outputs/<run>/ (config.yaml, adapter/, metrics, loss.png).

    \b
      qlocal train --model gemma-3-270m --data data/alpaca_sample.jsonl
      qlocal train --model Qwen/Qwen2.5-0.5B-Instruct --data my.jsonl --quantize 4bit --iters 200
      qlocal train --config configs/mapping_sentiment.yaml --set lora.rank=16
      qlocal train --resume outputs/<run>            # after Ctrl-C: continue from the last checkpoint
    """
    from qlocal import config as config_mod
    from qlocal.train import train as run_train

    if resume:
        given = [k for k, v in flags.items() if v is not None]
        if given or config_file or sets:
            raise UserError("--resume uses the run's saved config.yaml; drop the other options "
                            f"({', '.join('--' + k.replace('_', '-') for k in given) or '--config/--set'})")
        if not Path(resume, "config.yaml").is_file():
            from qlocal.rundir import check_exists, not_a_run

            check_exists(resume)  # a mistyped outputs/<run>: the runs that are there
            raise not_a_run(Path(resume))
        run_train(config_mod.Config(), resume=Path(resume), quiet=quiet)
        return
    mapped = {TRAIN_FLAGS[k]: v for k, v in flags.items() if v is not None}
    cfg = config_mod.build(config_file, mapped, sets)
    run_train(cfg, quiet=quiet)


@cli.group()
def data() -> None:
    """Inspect training data."""


@data.command("check", short_help="Formats, token lengths and one rendered example of a data file.")
@click.argument("file", required=False)
@_opt("--config", "config_file", type=click.Path(dir_okay=False), help="YAML config: its model and data section (path, format, field mapping) are used.")
@_opt("--set", "sets", multiple=True, default=(), metavar="KEY=VALUE", help="Override a config key, e.g. --set data.label_field=y.")
@_opt("--model", "-m", help="Model whose tokenizer and template to use. [default: the config's, else gemma-3-270m]")
@_opt("--chat-template", help=f"{TEMPLATE_NAMES} or a .jinja file.")
@_opt("--format", "data_format", type=click.Choice(["auto", "alpaca", "sharegpt", "messages", "completion", "text", "pairs", "pairs_implicit", "kto"]), help="[default: auto]")
@_opt("--max-seq-len", type=int, help="[default: 1024]")
@_opt("--train-on-prompt", is_flag=True, default=None)
@_opt("--skip-bad-lines", is_flag=True, default=None)
@_opt("--method", type=click.Choice(["sft", "dpo", "orpo", "kto", "simpo"]), help="Check as this method reads it (kto unpairs pairs). [default: sft; preference data is recognised by its keys]")
def data_check(file: str | None, config_file: str | None, sets: tuple[str, ...], **flags: Any) -> None:
    """Counts per format, token-length statistics, truncation and one rendered example.

    \b
      qlocal data check data/alpaca_sample.jsonl --model gemma-3-270m
      qlocal data check --config configs/mapping_sentiment.yaml    # a config's field mapping
    """
    from qlocal import config as config_mod
    from qlocal.data.check import check_report
    from qlocal.data.templates import add_missing_markers, resolve_chat_template
    from qlocal.data.readers import load_records
    from qlocal.hf import load_tokenizer
    from qlocal.models import check_model_name, resolve_model

    if file is None and config_file is None:
        raise UserError("give a data FILE, or --config FILE.yaml whose data.path to check")
    flags["data"] = file
    cfg = config_mod.build(config_file, {TRAIN_FLAGS[k]: v for k, v in flags.items() if v is not None}, sets)
    # The cheap checks first: the model name, then the file itself (missing, not JSON, ...), before
    # an alias converts or a model downloads.
    check_model_name(cfg.model.name, allow_pickle=cfg.model.allow_pickle)
    load_records(cfg.data.path, cfg.data.split, [] if cfg.data.skip_bad_lines else None)
    resolved = resolve_model(cfg.model.name, cfg.model.revision)
    tokenizer = load_tokenizer(resolved.path, cfg.model.trust_remote_code, cfg.lora.new_tokens)
    choice = cfg.model.chat_template or resolved.default_chat_template
    _, line = add_missing_markers(tokenizer, choice, training=False)  # rendered as training will render it
    template, _ = resolve_chat_template(tokenizer, choice)
    click.echo(check_report(cfg.data.path, tokenizer, template, cfg.data, cfg.train.method))
    if line:  # after the report: a data error stays the only line on stderr
        click.echo(line, err=True)


def _sampling_options(f: Any) -> Any:
    for opt in reversed([
        _opt("--max-tokens", type=int, default=256, show_default=True, help="Most tokens per answer."),
        _opt("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy."),
        _opt("--top-p", type=float, default=1.0, show_default=True),
        _opt("--backend", "-b", type=click.Choice(["auto", "torch", "mlx"]), default="auto", show_default=True,
             help="For runs and HF models; auto = as train picks (MLX on Apple Silicon, else PyTorch)."),
        _opt("--chat-template", help=f"For a plain HF model without its own template: {TEMPLATE_NAMES}|FILE.jinja."),
    ]):
        f = opt(f)
    return f


@cli.command(short_help="Answer a prompt or a JSONL file of prompts.")
@click.argument("target")
@_opt("--prompt", "-p", help="One user message to answer.")
@_opt("--system", help="System prompt.")
@_opt("--input-file", type=click.Path(dir_okay=False, exists=True), help="JSONL of {prompt} or {messages} records.")
@_opt("--output", type=click.Path(dir_okay=False), help="Where --input-file answers go (JSONL).")
@_opt("--tools", "tools_file", type=click.Path(dir_okay=False), help="JSON list of function schemas the model may call (records' own `tools` win); calls go to a `tool_calls` field.")
@_sampling_options
def generate(target: str, prompt: str | None, system: str | None, input_file: str | None, output: str | None,
             tools_file: str | None, max_tokens: int, temperature: float, top_p: float, backend: str,
             chat_template: str | None) -> None:
    """Answer a prompt (or a file of prompts) with a run, an export folder, a GGUF or an HF model.

    \b
      qlocal generate outputs/<run> --prompt "What is the capital of Japan?"
      qlocal generate export/<run> --input-file prompts.jsonl --output answers.jsonl
    """
    from qlocal.infer import ContextFull, Sampling, check_inputs, check_target, generate_file, open_generator
    from qlocal.tool_chat import assistant_turn, load_tools, tool_tag

    if (prompt is None) == (input_file is None):
        raise UserError("give exactly one of --prompt TEXT or --input-file in.jsonl (with --output out.jsonl)")
    if input_file and not output:
        raise UserError("--input-file needs --output out.jsonl")
    tools = load_tools(tools_file) if tools_file else None  # a bad file fails before the model loads
    check_target(target)
    if input_file:
        check_inputs(Path(input_file))  # a bad line too
    sampling = Sampling(max_tokens=max_tokens, temperature=temperature, top_p=top_p)
    gen = open_generator(target, backend, chat_template)
    if input_file:
        n = generate_file(gen, Path(input_file), Path(output or ""), sampling, tools)
        click.echo(f"wrote {n} answers to {output}", err=True)
        return
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt or ""}]
    try:
        msg = assistant_turn(gen, messages, sampling, tools, tool_tag(gen, tools, "--tools"), sys.stdout)
    except ContextFull as e:
        raise e.for_generate("--prompt") from None
    if not msg.get("tool_calls"):
        click.echo()


@cli.command(short_help="Chat with a run, an export, a GGUF or an HF model.")
@click.argument("target")
@_opt("--system", help="System prompt (kept across /reset).")
@_opt("--tools", "tools_file", type=click.Path(dir_okay=False), help="JSON list of function schemas the model may call; each call is shown and you type its result.")
@_sampling_options
def chat(target: str, system: str | None, tools_file: str | None, max_tokens: int, temperature: float, top_p: float,
         backend: str, chat_template: str | None) -> None:
    """Chat with a run, an export folder, a GGUF or an HF model; replies stream as they are generated.

    \b
    One message per line. /reset clears the conversation, /exit (or Ctrl-D) quits.
      qlocal chat outputs/<run>
      qlocal chat export/<run> --system "Answer briefly." --temperature 0.7
      qlocal chat export/<run> --tools tools.json     (a call prints as [tool call] NAME {ARGS}; type its result)
    """
    from qlocal.infer import Sampling, chat_loop, open_generator
    from qlocal.tool_chat import load_tools

    tools = load_tools(tools_file) if tools_file else None  # a bad file fails before the model loads
    gen = open_generator(target, backend, chat_template)
    chat_loop(gen, Sampling(max_tokens=max_tokens, temperature=temperature, top_p=top_p), system, tools=tools)


@cli.command("eval", short_help="Loss, perplexity and generation metrics on a test file.")
@click.argument("target")
@_opt("--data", "-d", required=True, help="Test data in any supported format (the run's field mapping applies).")
@_opt("--generate/--no-generate", default=True, show_default=True, help="Also generate answers and score ROUGE-L, BLEU, exact match (and accuracy/F1 for labels).")
@_opt("--max-tokens", type=int, default=128, show_default=True, help="Most tokens per generated answer.")
@_opt("--limit", type=int, help="Generate for at most N records (loss covers all). [default: 100; 50 with --compare-quants]")
@_opt("--compare-base", is_flag=True, default=False, help="Evaluate the run's base model too: columns base / fine-tuned / delta.")
@_opt("--compare-quants", is_flag=True, default=False, help="TARGET is an export folder: evaluate its run and every GGUF in it "
      "(one at a time) on the same records, one row each, and recommend the smallest file whose loss is within 0.05 "
      "nats/token of the run's and whose stops rate is >= the run's - 0.05.")
@_opt("--report", type=click.Path(dir_okay=False), help="JSON report path. [default: <run>/eval-<data>.json]")
@_opt("--backend", "-b", type=click.Choice(["auto", "torch", "mlx"]), default="auto", show_default=True, help="For runs and HF models.")
@_opt("--config", "config_file", type=click.Path(dir_okay=False), help="For an HF model or GGUF: a config whose chat template and data mapping apply.")
@_opt("--split", default="test", show_default=True, help="Split of a hub or saved dataset.")
@_opt("--skip-bad-lines", is_flag=True, default=False, help="Skip malformed records (counted) instead of stopping.")
@_opt("--quiet", is_flag=True, default=False, help="No progress bar.")
def eval_cmd(target: str, data: str, generate: bool, max_tokens: int, limit: int | None, compare_base: bool,
             compare_quants: bool, report: str | None, backend: str, config_file: str | None, split: str, skip_bad_lines: bool,
             quiet: bool) -> None:
    """Loss, perplexity and generation metrics of a run, an HF model or a GGUF on a test file; on
    preference pairs (or KTO answers), a run's reward accuracy, margins and its method's loss.

    \b
      qlocal eval outputs/<run> --data test.jsonl --compare-base
      qlocal eval export/<run> --data test.jsonl --no-generate
      qlocal eval export/<run> --data test.jsonl --compare-quants   (which quant to ship)
      qlocal eval outputs/<dpo-run> --data held_out_pairs.jsonl --compare-base
    """
    from qlocal.evaluate import EvalOptions, run_eval

    if limit is None:
        from qlocal.quant_eval import DEFAULT_LIMIT

        limit = DEFAULT_LIMIT if compare_quants else 100
    if limit < 0 or max_tokens <= 0:
        raise UserError("--limit must be >= 0 and --max-tokens > 0")
    opts = EvalOptions(data=data, generate=generate, max_tokens=max_tokens, limit=limit, compare_base=compare_base,
                       report=Path(report) if report else None, backend=backend, config_file=config_file, split=split,
                       skip_bad_lines=skip_bad_lines)
    if compare_quants:
        from qlocal.quant_eval import run_compare

        run_compare(target, opts, echo=click.echo, quiet=quiet)
        return
    run_eval(target, opts, echo=click.echo, quiet=quiet)


@cli.command("export", short_help="A run to GGUF (quantised, verified) and an Ollama Modelfile.")
@click.argument("run_dir", type=click.Path())
@_opt("--gguf/--no-gguf", default=True, help="Write GGUF files (default on); --no-gguf writes only the fused HF folder.")
@_opt("--quant", default="q4_k_m", show_default=True, help="Comma list: f32,f16,bf16,q8_0,q4_k_m,q4_k_s,q5_k_m,q5_k_s,q6_k,q3_k_m,q4_0,q5_0. The first is what the Modelfile uses.")
@_opt("--out", type=click.Path(), help="Output folder. [default: export/<run>]")
@_opt("--ollama-create", "ollama_name", metavar="NAME", help="Run `ollama create NAME` (or print the command when ollama is not installed).")
@_opt("--no-verify", is_flag=True, default=False, help="Skip the llama-cpp-python checks (tokens, logits, greedy, stops).")
@_opt("--adapter-only", is_flag=True, default=False, help="GGUF LoRA adapter + base GGUF + Modelfile with ADAPTER, instead of a fused GGUF.")
@_opt("--system", help="System prompt for the Modelfile's SYSTEM line.")
@_opt("--allow-tokenizer-mismatch", is_flag=True, default=False, help="Export even when no llama.cpp pre-tokenizer tokenises like the HF tokenizer (warns; the GGUF then splits some text differently).")
@_opt("--fused-dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto", show_default=True, help="dtype of the fused/ HF folder (auto: the base's own). GGUFs are written from the fp32 merge either way.")
def export(run_dir: str, gguf: bool, quant: str, out: str | None, ollama_name: str | None, no_verify: bool,
           adapter_only: bool, system: str | None, allow_tokenizer_mismatch: bool, fused_dtype: str) -> None:
    """Fuse a run's adapter, convert to GGUF, quantise, verify and write an Ollama Modelfile.

    \b
      qlocal export outputs/<run> --gguf --quant q4_k_m,q8_0
      qlocal export outputs/<run> --ollama-create my-model
    """
    from qlocal import rundir
    from qlocal.export.pipeline import ExportOptions, export_run

    rundir.check_exists(run_dir)  # a mistyped outputs/<run>: the runs that are there
    rundir.check_finished(Path(run_dir))  # still training, or stopped before its adapter/
    result = export_run(Path(run_dir), ExportOptions(
        quants=quant.split(","), out_dir=Path(out) if out else None, gguf=gguf, verify=not no_verify,
        adapter_only=adapter_only, system=system, ollama_name=ollama_name,
        allow_tokenizer_mismatch=allow_tokenizer_mismatch, fused_dtype=fused_dtype), echo=click.echo)
    if result.verify_passed is False:
        click.echo(f"error: verification failed; see {result.out_dir}/verify.json", err=True)
        sys.exit(1)


@cli.command(short_help="Serve a GGUF or export folder as an OpenAI-compatible API.")
@click.argument("target")
@_opt("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@_opt("--host", default="127.0.0.1", show_default=True, help="0.0.0.0 to accept other machines (no authentication!).")
@_opt("--n-ctx", type=int, default=4096, show_default=True, help="Context window (capped at the model's).")
@_opt("--name", "alias", help="Model name clients ask for. [default: the export folder or GGUF name]")
def serve(target: str, port: int, host: str, n_ctx: int, alias: str | None) -> None:
    """Serve a GGUF or an export folder as an OpenAI-compatible API (llama-cpp-python's server).

    \b
      qlocal serve export/<run> --port 8000
      curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
           -d '{"messages": [{"role": "user", "content": "Hello"}]}'
    """
    from qlocal.serve import serve as run_server

    run_server(target, host=host, port=port, n_ctx=n_ctx, alias=alias)


@cli.command(short_help="Local web UI: runs, charts, new runs, exports, chat.")
@_opt("--host", default="127.0.0.1", show_default=True, help="Bind address; any non-loopback host requires a token.")
@_opt("--port", type=click.IntRange(1, 65535), default=7860, show_default=True)
@_opt("--token", help="Token every request must carry. [default: none on 127.0.0.1, generated and printed otherwise]")
@_opt("--root", type=click.Path(file_okay=False), default=".", show_default=True, help="Folder holding outputs/, export/, data/.")
def studio(host: str, port: int, token: str | None, root: str) -> None:
    """Local web UI: runs, live training charts, new runs, exports and chat (needs the studio extra).

    \b
      qlocal studio                  # http://127.0.0.1:7860/
      qlocal studio --host 0.0.0.0   # other machines: prints a token to use
    """
    from qlocal.studio.server import run_studio

    run_studio(Path(root), host=host, port=port, token=token, echo=click.echo)


@cli.command(short_help="Platform, accelerators, extras, and the backend auto picks.")
@_opt("--model", "-m", help="Also say whether this model (folder, hub id or alias) will export to GGUF.")
def doctor(model: str | None) -> None:
    """Print the platform, accelerators, installed extras and which backend `auto` picks and why."""
    from qlocal.doctor import doctor_report

    click.echo(doctor_report(model))


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one line on stderr and exit status 2, never a traceback."""
    try:
        cli.main(args=argv, prog_name="qlocal", standalone_mode=False)
    except UserError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except RuntimeError as e:
        from qlocal.distributed import lost_peer

        lost = lost_peer(e)  # a rank that outlived a failed one: one line under the failing rank's own
        if lost is None:
            raise
        click.echo(f"error: {lost}", err=True)
        sys.exit(1)
    except OSError as e:
        if e.errno not in _DISK_FULL:
            raise
        # The atomic writers have already removed their temps; nothing half-written is left.
        where = f" writing {e.filename}" if e.filename else ""
        click.echo(f"error: no space left on the device{where}: free some space, or write elsewhere "
                   "(--out / --output-dir), and run it again", err=True)
        sys.exit(2)


_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}
