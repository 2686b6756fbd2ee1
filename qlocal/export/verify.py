"""Prove a GGUF serves like the trained model: tokens, logits, greedy text and the stop set.

For each GGUF, llama-cpp-python loads it and we check against the reference, which in an export is
base + adapter in fp32 (the model that was trained; the fused folder's own error is reported
beside), and the fused folder's tokenizer:

* tokenisation of a probe set (plain text, the chat-rendered prompt with its special tokens,
  unicode, digits) equals the HF tokenizer's, with and without BOS handling;
* logits NMSE = mean((gguf - hf)^2) / mean(hf^2) over every position of the chat probes is below
  1e-3 at 16/32-bit (required); for quantised files it is reported beside a guide value;
* greedy next tokens agree (teacher-forced on the HF greedy continuation, so one near-tie does not
  cascade): all of them at 16/32-bit, at least GREEDY_MIN for quantised files;
* the stop set ends generation: each Modelfile stop string is one token that llama.cpp treats as
  end-of-generation, EOS/EOT are in the set, and a completion pushed onto that token stops there
  with finish_reason "stop" (tiny random models never choose it on their own);
* each file ends its turn where the reference does: where the reference's greedy emits an
  end-of-generation token at position k, the file's own greedy must emit one by k + slack
  (qlocal.export.end_of_turn; a probe where the reference runs on is "not applicable").
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qlocal import atomic
from qlocal.export import end_of_turn
from qlocal.export.fuse import PROBE_CONVERSATIONS, render_chat

NMSE_LIMITS: dict[str, float] = {
    # Required: 16/32-bit files differ from the HF model only by rounding (fp16/bf16 weights,
    # different matmul order), which gives NMSE ~1e-6..1e-4.
    "f32": 1e-3, "f16": 1e-3, "bf16": 1e-3,
    # Quantised files: reported only. On the real Gemma 3 270M the same healthy Q4_K_M pipeline
    # measured NMSE 0.17 on one fine-tune and 2.1 on another (small logit scale, per-position
    # shifts that softmax ignores), while f16 gave 3e-7..4e-7 and q8_0 2.7e-4 from the same
    # converter. So NMSE cannot tell "lossy" from "wrong" for K-quants; greedy agreement can
    # (see GREEDY_MIN). The figures below are informational guides printed beside the NMSE.
    "q8_0": 0.05, "q6_k": 0.15, "q5_k_m": 0.2, "q5_k_s": 0.2, "q5_0": 0.2,
    "q4_k_m": 0.35, "q4_k_s": 0.35, "q4_0": 0.4, "q3_k_m": 0.5,
}
EXACT = ("f32", "f16", "bf16")
"""Types where greedy agreement is required, not just reported."""
GREEDY_MIN = 0.5
"""Quantised files must pick the HF model's next token (teacher-forced, outside near-ties) at least
this often. Measured: 81-86% for Q4_K_M on a fine-tuned Gemma 3 270M, 97-100% for q8_0/q4 on tiny
models; a broken file (wrong layout/permutation/rope) agrees ~1/vocab of the time."""
TIE_MARGIN = 1e-3
"""HF top-2 logit gaps below this are ties; disagreeing there says nothing about the file."""
GREEDY_TOKENS = 12

PLAIN_PROBES = [
    "The quick brown fox jumps over the lazy dog.",
    "Numbers: 0 7 42 1234 3.14159 2025-06-01, and 1,000,000!",
    "Unicode: naïve café, Straße, 日本語のテキスト, emoji 🙂, Ελληνικά.",
    "  leading spaces, tabs\tand\nnewlines\n\nend ",
    "def f(x):\n    return x ** 2  # code",
]


@dataclass
class FileCheck:
    """Verification of one GGUF file."""

    file: str
    quant: str
    tokenizer_match: bool
    token_mismatches: list[str]
    nmse: float
    nmse_limit: float
    greedy_agree: float
    """Fraction of teacher-forced greedy steps (outside near-ties) where llama.cpp's argmax equals HF's."""
    greedy_text_equal: bool
    """Free-running llama.cpp greedy continuation == HF's, token for token."""
    stops_ok: bool
    stop_details: dict[str, Any]
    passed: bool
    problems: list[str] = field(default_factory=list)
    lora: str | None = None
    nmse_without_lora: float | None = None
    """With a LoRA: the base GGUF alone vs the fused model, a control showing the adapter matters."""
    tool_calls: dict[str, Any] | None = None
    """Tool-call preflight (qlocal.tool_eval): held-out tool prompts answered by this file; reported,
    not part of `passed` (it measures what the model learned, not whether the file serves it)."""
    ends_turn: dict[str, Any] | None = None
    """Where the reference and this file first emit end-of-generation per probe (end_of_turn.judge);
    `passed` None when the reference ended on no probe."""


def _limit(quant: str) -> float:
    return NMSE_LIMITS.get(quant, 0.5)


def threads() -> int:
    """llama.cpp threads: the cores other processes leave free (1-minute load average, this process
    counted as one), at least 1 and at most 4. ggml's threads spin at every barrier, so more threads
    than free cores make each token wait for a descheduled thread: on a 2-core box at load 20, six
    greedy tokens of a 0.5B q8_0 file took 99 s with 2 threads and 7.7 s with 1."""
    from qlocal.export.ref_runs import free_cores

    return free_cores(4)


def load_llama(path: Path, lora: Path | None = None, n_ctx: int = 256, logits_all: bool = True) -> Any:
    """llama-cpp-python model with logits for every position (CPU, quiet), or with `logits_all`
    False for the last position only (the head then runs once per batch); a file llama.cpp refuses
    is a one-line UserError naming llama.cpp's reason."""
    from qlocal.llamacpp import load_llama as load

    kw: dict[str, Any] = {"n_ctx": n_ctx, "logits_all": logits_all, "seed": 0, "n_threads": threads(),
                          "n_threads_batch": threads()}
    if lora is not None:
        kw["lora_path"] = str(lora)
    return load(path, **kw)


def gguf_logits(llm: Any, ids: list[int]) -> Any:
    """Logits (n_tokens, vocab) for `ids` from a fresh context (float32, as llama.cpp gives them)."""
    import numpy as np

    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


class HFReference:
    """The reference logits and greedy continuations, and the fused folder's tokenizer, computed once
    and shared by every GGUF check.

    With `trained` = (base folder, adapter folder) the reference is the model that was trained:
    base + adapter (unmerged) in fp32, and `fused` reports the fused folder's own error against it;
    without, the HF folder itself (in fp32) is the reference. Every forward runs layer by layer
    (qlocal.export.layerwise: one decoder layer's weights in memory at a time), and all of it is
    done before any GGUF is opened for checking (the draft's file is closed first), so the process
    never holds the HF model and a GGUF together. The
    tokenizer (~300 MB resident for a 262k vocabulary) is dropped once the probes are tokenised and
    loaded again only if something asks for `tokenizer`.

    `draft` (a GGUF to verify, with `lora` on it) gives each probe's greedy continuation as llama.cpp
    sees it first (the file is then closed): the reference's greedy decoding checks it in one
    forward (ref_runs._Runs.greedy) instead of one forward per token, and gets the same tokens;
    after a miss (a near-tie the quantised file breaks the other way) each further token is one
    step on that forward's KV cache. verify_gguf reuses the draft as that file's free greedy.
    `fuse` (a FuseReport written without its figures) is completed from these same passes plus the
    fp32 merge's, so the export computes each reference once (fuse.complete_report)."""

    def __init__(self, hf_dir: Path, trained: tuple[Path, Path] | None = None, draft: Path | None = None,
                 lora: Path | None = None, fuse: Any = None) -> None:
        from transformers import AutoTokenizer

        from qlocal.export.fuse import reference_lm
        from qlocal.hf import quiet_transformers
        from qlocal.memory import release

        quiet_transformers()
        self.hf_dir = Path(hf_dir)
        self._tokenizer: Any = None
        tok = AutoTokenizer.from_pretrained(str(hf_dir))
        self.template = tok.chat_template
        self.chat_texts = [render_chat(tok, self.template, c) for c in PROBE_CONVERSATIONS]
        self.chat_ids = [tok(t, add_special_tokens=False)["input_ids"] for t in self.chat_texts]
        cases = [(t, False) for t in PLAIN_PROBES + self.chat_texts] + [(t, True) for t in PLAIN_PROBES[:2]]
        self.token_cases = [(t, special, tok(t, add_special_tokens=special)["input_ids"]) for t, special in cases]
        """(text, add_special_tokens, HF ids) for each tokenisation probe."""
        del tok
        release()
        drafts = _drafts(draft, lora, self.chat_ids, GREEDY_TOKENS) if draft is not None else None
        release()  # the GGUF is unmapped before the reference runs
        self.drafted = (draft, lora, drafts) if draft is not None else None
        """(file, lora, its greedy tokens per probe): verify_gguf takes that file's free greedy from it."""
        lm = reference_lm("trained", *trained) if trained is not None else reference_lm("folder", Path(hf_dir))
        run = lm.greedy(self.chat_ids, GREEDY_TOKENS, drafts)
        lm.close()
        self.forwards = run.forwards
        """Forwards (passes over the weights) the greedy reference took: 1 when the draft was right."""
        self.reference = "base + adapter (fp32)" if trained is not None else f"{Path(hf_dir).name} (fp32)"
        self.computed = lm.mode
        self.logits: list[Any] = run.prompt_logits
        self.greedy: list[list[int]] = run.tokens
        self.teacher: list[Any] = run.step_logits
        """Per probe, (GREEDY_TOKENS, vocab): the logits each greedy token was chosen from."""
        self.fused: dict[str, Any] | None = None
        if trained is not None:
            fused_lm = reference_lm("folder", Path(hf_dir))
            folder = fused_lm.logits(self.chat_ids)
            fused_lm.close()
            self.fused = _fused_error(Path(hf_dir), folder, self.logits)
            del folder
            if fuse is not None:
                from qlocal.export.fuse import complete_report

                complete_report(fuse, trained, self.chat_ids, self.logits, self.fused["max_abs_logit_diff"],
                                self.computed)
        release()
        # llama.cpp keeps n_ctx x vocab floats twice (its output buffer, llama-cpp-python's scores):
        # a context just long enough for the probes, their continuations and the stop checks.
        longest = max(len(i) + end_of_turn.needed(len(c) - 1, len(c)) for i, c in zip(self.chat_ids, self.greedy))
        self.n_ctx = 64 * -(-(longest + 16) // 64)

    @property
    def tokenizer(self) -> Any:
        """The fused folder's HF tokenizer, loaded on first use."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(self.hf_dir))
        return self._tokenizer


def _drafts(path: Path, lora: Path | None, prompts: list[list[int]], n: int) -> list[list[int]]:
    """llama.cpp's greedy continuation of each prompt in the GGUF at `path`, `n` tokens (through any
    end-of-generation: the reference's greedy never stops either); the file is closed on return."""
    longest = max(len(p) for p in prompts) + n
    llm = load_llama(path, lora, 64 * -(-(longest + 1) // 64), logits_all=False)
    try:
        out = []
        for ids in prompts:
            llm.reset()
            toks: list[int] = []
            for t in llm.generate(ids, temp=0.0, top_k=1):
                toks.append(int(t))
                if len(toks) >= n:
                    break
            out.append(toks)
    finally:
        llm.close()
    return out


def _fused_error(hf_dir: Path, fused: list[Any], ref: list[Any]) -> dict[str, Any]:
    """The fused folder's own logits error against the reference (same measure as the GGUFs')."""
    num = sum(_sq(f, r) for f, r in zip(fused, ref))
    den = sum(_sq(r) for r in ref)
    cfg = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    return {"folder": hf_dir.name, "dtype": cfg.get("dtype") or cfg.get("torch_dtype"),
            "nmse": num / max(den, 1e-30),
            "max_abs_logit_diff": max(float(abs(f - r).max()) for f, r in zip(fused, ref))}


def _sq(a: Any, b: Any = None) -> float:
    """sum((a - b)^2) (or sum(a^2)), one row at a time (the logits are vocab wide): each row's
    difference and dot product in float32 (relative error ~1e-7 per row), summed in float64."""
    import numpy as np

    total = 0.0
    for k in range(len(a)):
        x = np.asarray(a[k], dtype=np.float32)
        if b is not None:
            x = x - np.asarray(b[k], dtype=np.float32)
        total += float(np.dot(x, x))
    return total


def _check_tokens(ref: HFReference, llm: Any) -> list[str]:
    bad = []
    for text, with_special, hf in ref.token_cases:
        gg = llm.tokenize(text.encode("utf-8"), add_bos=with_special, special=True)
        if hf != gg:
            bad.append(f"{text[:30]!r} (add_special={with_special}): hf {hf[:12]}... gguf {gg[:12]}...")
    return bad


def _free_greedy(llm: Any, ids: list[int], n: int, drafted: list[int] | None = None) -> tuple[list[int], int | None]:
    """llama.cpp's own greedy continuation of `ids`: at most `n` tokens, ending at end-of-generation,
    and the position of that end-of-generation token (None if none came within `n`); from `drafted`
    (this file's greedy tokens from `ids`, through any end-of-generation) as far as it goes.

    Counted in tokens: create_completion keeps sampling past max_tokens while the text is an
    incomplete UTF-8 sequence (byte-fallback tokens), and then runs off the end of the context."""
    is_eog = end_of_turn.eog_test(llm)

    def stream() -> Any:
        yield from drafted or ()
        # Past the draft (or without one): generate reuses the context's matching prefix.
        yield from llm.generate(ids + list(drafted or ()), temp=0.0, top_k=1)

    out: list[int] = []
    tokens = stream()
    while len(out) < n:  # checked before each token: llama.cpp evaluates none past the n-th
        t = int(next(tokens))
        if is_eog(t):
            return out, len(out)
        out.append(t)
    return out, None


def verify_gguf(ref: HFReference, path: Path, quant: str, stops: list[str], lora: Path | None = None,
                allow_token_mismatch: bool = False) -> FileCheck:
    """Check one GGUF (optionally with a GGUF LoRA on top) against the fused HF reference.

    `allow_token_mismatch` (the export's --allow-tokenizer-mismatch) reports differing tokenisation
    without failing the file."""
    import numpy as np

    llm = load_llama(path, lora, ref.n_ctx)
    try:
        mismatches = _check_tokens(ref, llm)
        num = den = 0.0
        agree = total = 0
        text_equal = True
        is_eog = end_of_turn.eog_test(llm)
        ends: tuple[list[Any], list[Any], list[Any]] = ([], [], [])  # reference at, this file at, margin
        # The file that drafted the reference's greedy has already generated its own from each probe.
        own = list(ref.drafted[2]) if ref.drafted and ref.drafted[:2] == (path, lora) else None
        for ids, hf_logits, cont, hf_full in zip(ref.chat_ids, ref.logits, ref.greedy, ref.teacher):
            # One evaluation of prompt + HF's greedy continuation gives both the prompt's logits and
            # the teacher-forced ones (same prefix: compare argmax at each continuation step).
            full = ids + cont
            llm.reset()
            llm.eval(full)
            scores = llm.scores  # llama-cpp-python's own buffer: read before the next evaluation
            num += _sq(scores[: len(ids)], hf_logits)
            den += _sq(hf_logits)
            for h, g in zip(hf_full, scores[len(ids) - 1: len(full) - 1]):
                top2 = np.sort(h)[-2:]
                if top2[1] - top2[0] < TIE_MARGIN:
                    continue
                total += 1
                agree += int(np.argmax(h) == np.argmax(g))
            # The reference's greedy runs through its end of turn; this file's is run past it by the slack.
            at = end_of_turn.first_eog(cont, is_eog)
            free, free_at = _free_greedy(llm, ids, end_of_turn.needed(at, len(cont)), own.pop(0) if own else None)
            ends[0].append(at)
            ends[1].append(free_at)
            ends[2].append(None if at is None else end_of_turn.margin(hf_full[at]))
            # The text up to each one's end of turn: equal tokens, or (rarely) other tokens spelling
            # the same text; llama.cpp's detokeniser spells both, as the tokenizer check above proved
            # its vocabulary is HF's.
            free, said = free[: len(cont)], cont[:at]
            text_equal = text_equal and (free == said or llm.detokenize(free, special=True)
                                         == llm.detokenize(said, special=True))
        stops_ok, stop_detail = end_of_turn.check_stops(llm, stops)
    finally:
        llm.close()
    nmse = num / max(den, 1e-30)
    control = _nmse_only(ref, path) if lora is not None else None
    greedy = agree / total if total else 1.0
    problems = []
    if mismatches and not allow_token_mismatch:
        problems.append(f"tokenisation differs on {len(mismatches)} probes")
    if quant in EXACT and not nmse < _limit(quant):
        problems.append(f"logits NMSE {nmse:.2e} >= {_limit(quant):g}")
    if quant in EXACT and greedy < 1.0:
        problems.append(f"greedy agreement {greedy:.0%} at {quant}")
    if quant not in EXACT and greedy < GREEDY_MIN:
        problems.append(f"greedy agreement {greedy:.0%} < {GREEDY_MIN:.0%} at {quant}")
    if not stops_ok:
        problems.append("stop set does not end generation")
    turn = end_of_turn.judge(*ends[:2], GREEDY_TOKENS, ends[2])
    if (msg := end_of_turn.problem(quant, turn, quant in EXACT)) is not None:
        problems.append(msg)
    return FileCheck(str(path.name), quant, not mismatches, mismatches, nmse, _limit(quant), greedy, text_equal,
                     stops_ok, stop_detail, not problems, problems, str(lora.name) if lora else None, control,
                     ends_turn=turn)


def _nmse_only(ref: HFReference, path: Path) -> float:
    llm = load_llama(path, n_ctx=ref.n_ctx)
    try:
        num = sum(_sq(gguf_logits(llm, ids), h) for ids, h in zip(ref.chat_ids, ref.logits))
    finally:
        llm.close()
    return num / max(sum(_sq(h) for h in ref.logits), 1e-30)


def verify_all(hf_dir: Path, files: list[tuple[Path, str]], stops: list[str], out_json: Path,
               lora: Path | None = None, tokenizer: dict[str, Any] | None = None,
               trained: tuple[Path, Path] | None = None, tool_prompts: tuple[list[Any], str, int] | None = None,
               fuse: Any = None) -> list[FileCheck]:
    """Verify each (gguf path, quant); write verify.json atomically. A `lora` applies to every file.

    `trained` = (base folder, adapter folder): measure every file against base + adapter in fp32
    (the trained model) and record the fused folder's own error there too (see HFReference).

    `tokenizer` is the export's pre-tokenizer check (PreTokenizerCheck.to_dict()), recorded in
    verify.json; when it allowed a mismatch, differing tokenisation does not fail a file.
    `tool_prompts` = (qlocal.tool_eval prompts, where they came from, data.max_seq_len): each file
    answers them too. `fuse`: a FuseReport without its figures, completed from the same reference
    passes (see HFReference)."""
    draft = next((p for p, q in files if q in EXACT), files[0][0]) if files else None
    ref = HFReference(hf_dir, trained, draft, lora, fuse)
    allow = bool(tokenizer and tokenizer.get("allowed_mismatch"))
    checks = [verify_gguf(ref, p, q, stops, lora, allow) for p, q in files]
    if tool_prompts and tool_prompts[0]:
        from qlocal.tool_eval import gguf_tool_calls

        for check, (p, _) in zip(checks, files):
            check.tool_calls = gguf_tool_calls(p, lora, ref.tokenizer, ref.template, *tool_prompts)
    doc = {"passed": all(c.passed for c in checks), "nmse_limits": NMSE_LIMITS, "nmse_required_for": EXACT,
           "greedy_min_quantised": GREEDY_MIN, "tie_margin": TIE_MARGIN,
           "stops": stops, "pretokenizer": tokenizer, "reference": ref.reference,
           "reference_computed": ref.computed, "reference_forwards": ref.forwards, "fused": ref.fused,
           "files": [asdict(c) for c in checks]}
    if tool_prompts is not None:  # how many tool prompts each file answered, and from where (or why none)
        doc["tool_prompts"] = {"count": len(tool_prompts[0]), "source": tool_prompts[1]}
    atomic.write_text(out_json, json.dumps(doc, indent=1, ensure_ascii=False))
    return checks


def table(checks: list[FileCheck]) -> str:
    """A short fixed-width summary of verify results."""
    rows = [f"{'file':<28} {'tokens':<7} {'NMSE':>9} {'limit':>7} {'greedy':>7} {'stops':<6} {'ends':<5} result"
            "   (limit: required at f16/bf16/f32, a guide for quantised files; ends: ends its turn where"
            " the reference does, n/a where the reference ran on)"]
    for c in checks:
        name = c.file + (f" + {c.lora}" if c.lora else "")
        rows.append(f"{name[:28]:<28} {'ok' if c.tokenizer_match else 'DIFF':<7} {c.nmse:>9.2e} {c.nmse_limit:>7.0e} "
                    f"{c.greedy_agree:>7.0%} {'ok' if c.stops_ok else 'FAIL':<6} {end_of_turn.cell(c.ends_turn):<5} "
                    f"{'pass' if c.passed else 'FAIL: ' + '; '.join(c.problems)}")
    return "\n".join(rows)
