"""How a GGUF stops: its stop set ends generation, and it ends its turn where the trained model does.

`check_stops`: each Modelfile stop string is one token llama.cpp treats as end-of-generation, and a
completion pushed onto it stops there (tiny random models never choose it on their own).

A quantised file can answer right and then never stop: the reference's greedy emits its
end-of-turn token with a small margin, the quantised logits tip it the other way, and the file
rambles to the token limit (the quickstart's Gemma 3 270M trained in bf16, Q4_K_M: NMSE 0.36 and
greedy agreement 0.83, yet it went on past `<end_of_turn>` to 64 tokens). Agreement and NMSE are
averages over every position and do not see one missed token; this check looks at that token.

Per probe: the reference's greedy continuation (GREEDY_TOKENS of them, the ones verify computes
anyway) ends its turn at position k when token k is end-of-generation for llama.cpp (the GGUF
vocabulary's EOG set: EOS, EOT, EOM and the end-of-turn tokens it recognises, the same ids that
stop Ollama and llama-server). The GGUF's own free greedy must then emit an EOG token by position
k + slack(k). A reference that does not end within its tokens makes the probe "not applicable",
and a file with no applicable probe has `passed` None, never a pass by default.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

SLACK_MIN = 8
"""At least this many tokens more than the reference (a short clause) still reads as "it stopped"."""


def slack(k: int) -> int:
    """Tokens past the reference's end a GGUF may run on and still count as ending its turn:
    max(SLACK_MIN, ceil(k / 2)). A quantised answer worded a little longer (up to half again, or a
    short clause for short answers) stops where a user expects; a rambling one runs to the limit."""
    return max(SLACK_MIN, -(-k // 2))


def first_eog(tokens: Sequence[int], is_eog: Callable[[int], bool]) -> int | None:
    """Position of the first end-of-generation token in `tokens`, or None."""
    return next((i for i, t in enumerate(tokens) if is_eog(int(t))), None)


def needed(reference_at: int | None, have: int) -> int:
    """Tokens the GGUF's free greedy must run to: through position k + slack(k) where the reference
    ended at k, else the `have` it runs anyway."""
    return have if reference_at is None else max(have, reference_at + slack(reference_at) + 1)


def judge(reference_at: list[int | None], gguf_at: list[int | None], budget: int,
          margins: list[float | None]) -> dict[str, Any]:
    """The ends_turn record of one file (verify.json), from where the reference and the file first
    emitted an end-of-generation token on each probe (None: not within the tokens looked at)."""
    status = []
    for ref, got in zip(reference_at, gguf_at):
        if ref is None:
            status.append("not applicable")
        elif got is not None and got <= ref + slack(ref):
            status.append("stops")
        else:
            status.append("does not stop")
    applicable = [s for s in status if s != "not applicable"]
    return {"reference_at": reference_at, "gguf_at": gguf_at,
            "limit": [None if r is None else r + slack(r) for r in reference_at],
            "reference_margin": margins, "status": status, "budget": budget,
            "passed": None if not applicable else all(s == "stops" for s in applicable)}


def check_stops(llm: Any, stops: list[str]) -> tuple[bool, dict[str, Any]]:
    """Whether the stop set ends generation in the GGUF open in `llm`: each stop string is one token
    llama.cpp treats as end-of-generation and a completion pushed onto it stops there with no text,
    and EOS/EOT are in the set; with the details per stop string."""
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    detail: dict[str, Any] = {"stops": {}, "eos": None, "eot": None}
    ok = True
    stop_ids = set()
    for s in stops:
        ids = llm.tokenize(s.encode("utf-8"), add_bos=False, special=True)
        is_eog = len(ids) == 1 and bool(llama_cpp.llama_vocab_is_eog(vocab, ids[0]))
        stopped = False
        if is_eog:
            stop_ids.add(ids[0])
            # Push the model onto this token: generation must end there, with no text.
            prompt = llm.tokenize(b"Hello", add_bos=True, special=True)
            out = llm.create_completion(prompt, max_tokens=8, temperature=0.0, logit_bias={ids[0]: 1e4})
            choice = out["choices"][0]
            stopped = choice["finish_reason"] == "stop" and choice["text"] == ""
        detail["stops"][s] = {"ids": ids, "eog": is_eog, "ends_generation": stopped}
        ok = ok and is_eog and stopped
    for key, fn in (("eos", llama_cpp.llama_vocab_eos), ("eot", llama_cpp.llama_vocab_eot)):
        tid = int(fn(vocab))
        if tid >= 0:
            detail[key] = {"id": tid, "in_stop_set": tid in stop_ids}
            ok = ok and tid in stop_ids
    return ok, detail


def eog_test(llm: Any) -> Any:
    """token id -> whether llama.cpp ends generation on it (the GGUF vocabulary's EOG set)."""
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    return lambda t: bool(llama_cpp.llama_vocab_is_eog(vocab, t))


def margin(row: Any) -> float:
    """How far the chosen token's logit is above the next one in a reference row."""
    import numpy as np

    top2 = np.partition(np.asarray(row, dtype=np.float32), -2)[-2:]
    return float(top2[1] - top2[0])


# Precision ladder of the types export writes, for the "use a larger type" hint.
_LADDER = ("q3_k_m", "q4_0", "q4_k_s", "q4_k_m", "q5_0", "q5_k_s", "q5_k_m", "q6_k", "q8_0", "f16", "bf16", "f32")


def problem(quant: str, ends: dict[str, Any], exact: bool) -> str | None:
    """One line naming the quant, the probes where it did not end its turn, and the fix (`exact`: a
    16/32-bit file, where no larger type helps); None when it ended wherever the reference did (or
    nothing was applicable)."""
    bad = [i for i, s in enumerate(ends["status"]) if s == "does not stop"]
    if not bad:
        return None
    where = ", ".join(f"{i + 1} (reference stops after {ends['reference_at'][i]} tokens; "
                      + (f"the GGUF after {ends['gguf_at'][i]})" if ends["gguf_at"][i] is not None
                         else f"the GGUF had not stopped after {ends['limit'][i] + 1})") for i in bad)
    head = f"{quant} does not end its turn on probe{'s' if len(bad) > 1 else ''} {where}"
    if exact:
        return head + ": a 16/32-bit file should stop where the trained model does; report this with verify.json"
    above = _LADDER[_LADDER.index(quant) + 1:] if quant in _LADDER else ()
    bigger = "/".join([q for q in ("q5_k_m", "q8_0", "f16") if q in above][:2]) or "f16"
    return head + f": use --quant {bigger}, or train longer so the end of turn is learned"


def cell(ends: dict[str, Any] | None) -> str:
    """The verify table's column: ok / FAIL / n/a (no probe where the reference ended)."""
    if ends is None or ends["passed"] is None:
        return "n/a"
    return "ok" if ends["passed"] else "FAIL"
