"""`qlocal export`: run folder -> fused HF -> GGUF(s) -> quantised GGUF(s) -> verify -> Modelfile.

Everything is built in a temp sibling of the output folder and renamed into place at the end, so a
failure (unsupported architecture, missing base, Ctrl-C) leaves no half-written export behind.

Output folder (default export/<run>/):
    fused/              HF safetensors folder (adapter merged into the 16-bit original base)
    model-<quant>.gguf  one per --quant (the first one is what the Modelfile uses)
    Modelfile           FROM the first GGUF, TEMPLATE, PARAMETER stop, SYSTEM
    verify.json         per-file checks (see qlocal.export.verify)
    export.json         summary: run, base, files, sizes, timings, fuse report, verify result
With --adapter-only the GGUFs are base-<quant>.gguf (the original base) + adapter.gguf (GGUF LoRA),
and the Modelfile has FROM the base and ADAPTER the LoRA.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlocal import atomic
from qlocal.errors import UserError


@dataclass
class ExportOptions:
    """What `qlocal export` was asked to do."""

    quants: list[str] = field(default_factory=lambda: ["q4_k_m"])
    out_dir: Path | None = None
    gguf: bool = True
    verify: bool = True
    adapter_only: bool = False
    system: str | None = None
    ollama_name: str | None = None
    allow_tokenizer_mismatch: bool = False
    """Export even when no llama.cpp pre-tokenizer tokenises like the HF tokenizer (warns instead)."""
    fused_dtype: str = "auto"
    """dtype of the fused/ HF folder: auto (the base's own), float32, bfloat16 or float16. GGUFs are
    written from the fp32 merge whatever this is."""


@dataclass
class ExportResult:
    out_dir: Path
    summary: dict[str, Any]
    verify_passed: bool | None
    """None when verification was skipped."""


def _quiet_llama_cpp() -> None:
    # llama.cpp logs every tensor while quantising/loading; our own table says what matters.
    try:
        import llama_cpp._logger as llog

        llog.set_verbose(False)
    except ImportError:
        pass


def _check_arch(base_path: Path) -> None:
    """Fail before any work if the converter does not support the base's architecture."""
    from qlocal.export.gguf_arch import find_family

    find_family(json.loads((base_path / "config.json").read_text(encoding="utf-8")))


def export_run(run_dir: Path, opts: ExportOptions, echo: Callable[[str], None] = print) -> ExportResult:
    """Export a run folder as described in the module docstring; returns the summary written."""
    from qlocal.export.fuse import read_run
    from qlocal.export.quantize import parse_quants

    t0 = time.perf_counter()
    info = read_run(Path(run_dir))  # every "not a run / base gone" error before anything is written
    quants = parse_quants(opts.quants) if opts.gguf else []
    if opts.gguf:
        _check_arch(info.base_path)
    if opts.adapter_only and not opts.gguf:
        raise UserError("--adapter-only writes GGUF files; drop --no-gguf")
    if opts.adapter_only and info.new_tokens:
        raise UserError(f"{run_dir}: the run added {', '.join(info.new_tokens)} to the vocabulary, and a GGUF LoRA "
                        "cannot (llama.cpp takes the vocabulary from the base GGUF); drop --adapter-only")
    final = Path(opts.out_dir) if opts.out_dir else Path("export") / info.name
    final.parent.mkdir(parents=True, exist_ok=True)
    _quiet_llama_cpp()
    from qlocal.hf import quiet_transformers

    quiet_transformers()  # before fuse imports peft: bitsandbytes logs at import, and errors stay one line
    with atomic.building(final) as tmp:  # also cleans what a killed export of `final` left
        summary = _build(info, opts, quants, tmp, echo)
        summary["seconds"] = round(time.perf_counter() - t0, 2)
        (tmp / "export.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False), encoding="utf-8")
    echo(f"export written to {final}/ in {summary['seconds']:.1f}s")
    if opts.ollama_name:
        from qlocal.export.ollama import ollama_create

        ollama_create(opts.ollama_name, final, echo)
    else:
        echo(f"serve it: cd {final} && ollama create <name> -f Modelfile")
    return ExportResult(final, summary, summary.get("verify", {}).get("passed"))


def _build(info: Any, opts: ExportOptions, quants: list[str], tmp: Path, echo: Callable[[str], None]) -> dict[str, Any]:
    from qlocal.export.fuse import fuse_run
    from qlocal.export.merge import merged_tensors
    from qlocal.export.ollama import build_modelfile
    from qlocal.memory import release

    summary: dict[str, Any] = {"run": str(info.run_dir.resolve()), "base": str(info.base_path),
                               "chat_template": info.template_name, "adapter_only": opts.adapter_only,
                               "quants": quants}
    echo(f"fusing adapter into {info.base_path} ...")
    # With verification, the fuse report's figures come from verify's reference passes (each
    # reference computed once per export); otherwise fuse_run computes them itself.
    deferred = bool(quants) and opts.verify
    fuse = fuse_run(info.run_dir, tmp / "fused", opts.fused_dtype, report=not deferred)
    release()  # what fuse's passes freed goes back to the OS before the converter's peak
    summary["fuse"] = fuse.to_dict()
    if not deferred:
        _fuse_line(fuse, echo)
    if not quants:
        return summary
    # GGUFs come from the fused model, or for --adapter-only from the untouched original base.
    src = info.base_path if opts.adapter_only else tmp / "fused"
    prefix = "base" if opts.adapter_only else "model"
    pre = _choose_pretokenizer(src, opts.allow_tokenizer_mismatch, echo)
    release()  # the tokenizers it loaded
    summary["tokenizer"] = pre.to_dict()
    # A fused GGUF is encoded from the streamed fp32 merge, not from fused/'s rounded copy of it.
    tensors = None if opts.adapter_only else merged_tensors(info.base_path, info.adapter_dir)
    files, reports = _write_ggufs(src, quants, tmp, prefix, info.template, info.name, pre, echo, tensors)
    summary["files"] = {q: {"file": p.name, "bytes": p.stat().st_size} for q, p in files}
    summary["quantize"] = reports
    adapter_file = None
    if opts.adapter_only:
        from qlocal.export import convert_lora_to_gguf

        echo("writing GGUF LoRA adapter ...")
        adapter_path = tmp / "adapter.gguf"
        convert_lora_to_gguf(info.adapter_dir, info.base_path, adapter_path)
        adapter_file = adapter_path.name
        summary["adapter"] = {"file": adapter_file, "bytes": adapter_path.stat().st_size}
    tok = _tokens(tmp / "fused")
    release()  # the tokenizer just loaded leaves ~300 MB in the heap for a 262k vocabulary
    mf = build_modelfile(files[0][1].name, info.template, tok["bos"], tok["eos"], opts.system, adapter_file)
    (tmp / "Modelfile").write_text(mf.text, encoding="utf-8")
    summary["modelfile"] = {"family": mf.family, "template": mf.template_source, "stops": mf.stops,
                            "system": mf.system, "uses": files[0][1].name, "notes": mf.notes}
    for note in mf.notes:
        echo(f"note: {note}")
    if opts.verify:
        from qlocal.export.verify import table, verify_all

        echo("verifying with llama-cpp-python ...")
        lora = tmp / adapter_file if adapter_file else None
        tools = _tool_prompts(info, echo)
        checks = verify_all(tmp / "fused", [(p, q) for q, p in files], mf.stops, tmp / "verify.json", lora,
                            tokenizer=pre.to_dict(), trained=(info.base_path, info.adapter_dir), tool_prompts=tools,
                            fuse=fuse)
        summary["fuse"] = fuse.to_dict()
        _fuse_line(fuse, echo)
        echo(table(checks))
        for c in checks:
            if c.tool_calls:
                from qlocal.tool_eval import summary_line

                echo(f"  {c.file}: {summary_line(c.tool_calls)}")
        fused_err = json.loads((tmp / "verify.json").read_text(encoding="utf-8")).get("fused")
        if fused_err:
            echo(f"  (reference: base + adapter in fp32; fused/ itself, {fused_err['dtype']}: "
                 f"NMSE {fused_err['nmse']:.2e})")
        summary["verify"] = {"passed": all(c.passed for c in checks),
                             "files": {c.file: c.passed for c in checks}, "fused": fused_err}
        if tools and tools[0]:
            summary["verify"]["tool_calls_valid"] = {c.file: c.tool_calls["valid_rate"] for c in checks}
    return summary


def _fuse_line(fuse: Any, echo: Callable[[str], None]) -> None:
    merge_note = "" if fuse.dtype == "float32" else \
        f"; the fp32 merge alone {fuse.max_abs_logit_diff_fp32:.1e}, the rest is {fuse.dtype} rounding"
    echo(f"  fused ({fuse.dtype}); max |logit diff| vs base+adapter {fuse.max_abs_logit_diff:.2e} "
         f"(logits up to {fuse.max_abs_logit:.1f}{merge_note})")


def _tool_prompts(info: Any, echo: Callable[[str], None]) -> tuple[list[Any], str, int] | None:
    """The tool prompts verify answers with each GGUF (qlocal.tool_eval.run_prompts), for a run whose
    template renders tool calls; None for one that does not."""
    from qlocal import rundir
    from qlocal.tool_calls import template_tag
    from qlocal.tool_eval import PREFLIGHT_PROMPTS, run_prompts

    if template_tag(info.template) is None:
        return None
    cfg = rundir.load_config(info.run_dir)[0]
    try:
        prompts, source = run_prompts(cfg, PREFLIGHT_PROMPTS)
    except UserError as e:  # the data moved or needs the network: the files are still verified
        prompts, source = [], str(e)
    if not prompts:
        echo(f"note: no tool-call preflight: {source}")
    return prompts, source, cfg.data.max_seq_len


def _choose_pretokenizer(src: Path, allow_mismatch: bool, echo: Callable[[str], None]) -> Any:
    """The llama.cpp pre-tokenizer for `src`'s tokenizer, chosen by behaviour once for every GGUF;
    a mismatch stops the export (one line) unless allowed."""
    from qlocal.export.pretokenizer import check_pretokenizer

    pre = check_pretokenizer(src)
    pre.require(allow_mismatch)
    if pre.matched:
        echo(f"  {pre.line()}")
    else:
        echo(f"warning: {pre.line()}; exporting anyway (--allow-tokenizer-mismatch)")
    return pre


def _write_ggufs(src: Path, quants: list[str], tmp: Path, prefix: str, template: str, name: str, pre: Any,
                 echo: Callable[[str], None], tensors: dict[str, Any] | None = None,
                 ) -> tuple[list[tuple[str, Path]], dict[str, Any]]:
    """Write one GGUF per quant; K-quants go through an F16 file (kept only if f16 was asked for).
    `tensors` (merged fp32 weights) replace `src`'s safetensors when given."""
    from qlocal.export import convert_hf_to_gguf
    from qlocal.export.quantize import DIRECT, gguf_name, quantize_gguf

    files: list[tuple[str, Path]] = []
    reports: dict[str, Any] = {}
    f16 = tmp / gguf_name("f16").replace("model", prefix)
    need_f16 = any(q not in DIRECT for q in quants)
    for q in [q for q in quants if q in DIRECT] + (["f16"] if need_f16 and "f16" not in quants else []):
        path = tmp / gguf_name(q).replace("model", prefix)
        t = time.perf_counter()
        echo(f"converting to GGUF {q} ...")
        convert_hf_to_gguf(src, path, outtype=q, chat_template=template, name=name, pretokenizer=pre,
                           tensors=tensors)
        reports[q] = {"seconds": round(time.perf_counter() - t, 2), "bytes": path.stat().st_size}
    for q in quants:
        if q in DIRECT:
            files.append((q, tmp / gguf_name(q).replace("model", prefix)))
            continue
        path = tmp / gguf_name(q).replace("model", prefix)
        echo(f"quantising {q} with llama.cpp ...")
        rep = quantize_gguf(f16, path, q)
        reports[q] = rep.to_dict()
        reports[q]["path"] = path.name
        if rep.fallback_tensors:
            echo(f"  note: {rep.fallback_tensors} weight tensors are not {q} (row length not a multiple of 256): "
                 f"{rep.tensor_types}")
        files.append((q, path))
    if need_f16 and "f16" not in quants:
        f16.unlink(missing_ok=True)
    return files, reports


def _tokens(hf_dir: Path) -> dict[str, str | None]:
    """BOS/EOS token texts of the exported tokenizer (for the Modelfile)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    return {"bos": tok.bos_token, "eos": tok.eos_token}
