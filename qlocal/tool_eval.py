"""Tool-call scoring: does a model answer tool prompts with calls Ollama will parse and a tool can run?

Shared by the export's preflight (verify.json, on each GGUF) and `qlocal eval` (a run or a GGUF):

  prompts   every assistant turn of a held-out chat that calls tools is one prompt: the conversation
            before it (tools declared) and the calls it makes as the reference; a run that held
            nothing out gets one prompt per declared tool, built from its schema (see schema_prompts)
  answers   greedy, rendered by the model's own template with tools= exactly as training renders
            (qlocal.data.render.chat_inputs), decoded with special tokens kept (Ollama's runner
            keeps them, and Mistral's [TOOL_CALLS] is one)
  parsing   qlocal.tool_calls: the tag rule Ollama uses, then check_call against the schemas

Metrics (fractions of all prompts):
  valid_rate       at least one call, every call names a declared tool, arguments a JSON object
                   with every required field, nothing after the tag unparsable
  valid_json_rate  the tag opened calls and all of them parsed as JSON calls (schema not consulted)
  name_accuracy    the called tool names equal the reference's (as a multiset: parallel calls may
                   come in any order)
  arguments_exact  names and arguments equal the reference's (same multiset rule)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

PREFLIGHT_PROMPTS = 24
"""At most this many prompts per GGUF in the export's preflight (a few seconds each on a CPU)."""
MAX_TOKENS = 160
"""Enough for the sample's longest parallel call; a model that has not learned to stop is cut here."""
FAILURE_EXAMPLES = 3


@dataclass
class ToolPrompt:
    """One prompt a tool-calling model should answer with calls."""

    where: str
    messages: list[dict[str, Any]]
    """The conversation before the calling turn."""
    tools: list[dict]
    reference: list[dict]
    """The calls the data makes there (internal form: {"function": {"name", "arguments": dict}})."""
    thinks: bool = False
    """The reference turn reasons first (a template's thinking switch is set to match)."""


def prompts_from_samples(samples: list[Any], limit: int | None = None) -> list[ToolPrompt]:
    """One prompt per calling assistant turn of each chat that declares tools, in file order."""
    out: list[ToolPrompt] = []
    for s in samples:
        messages = _chat_of(s)
        if messages is None or not s.tools:
            continue
        for i, m in enumerate(messages):
            if m["role"] == "assistant" and m.get("tool_calls"):
                where = s.where if i == _first_call(messages) else f"{s.where} (turn {i + 1})"
                out.append(ToolPrompt(where, messages[:i], s.tools, m["tool_calls"], bool(m.get("reasoning_content"))))
    return out[:limit] if limit is not None else out


def _chat_of(s: Any) -> list[dict[str, Any]] | None:
    """The conversation a sample holds up as right: an SFT chat's messages, a pair's prompt + chosen
    answer, a desirable KTO answer; None for anything else (an undesirable answer is no reference)."""
    if getattr(s, "kind", None) == "chat":
        return s.messages
    if hasattr(s, "chosen"):
        return [*s.prompt, *s.chosen]
    if getattr(s, "label", False) is True:
        return [*s.prompt, *s.completion]
    return None


def _first_call(messages: list[dict[str, Any]]) -> int:
    return next(i for i, m in enumerate(messages) if m["role"] == "assistant" and m.get("tool_calls"))


def _example(name: str, spec: dict[str, Any]) -> Any:
    """A plausible value for one schema property: its first enum value, else one of its type."""
    if spec.get("enum"):
        return spec["enum"][0]
    kind = spec.get("type")
    kind = kind[0] if isinstance(kind, list) and kind else kind
    return {"integer": 3, "number": 2.5, "boolean": True, "array": [], "object": {}}.get(kind, name.replace("_", " "))


def schema_prompts(tools: list[dict]) -> list[ToolPrompt]:
    """One prompt per declared tool when no held-out chats exist: the user asks for that tool by
    name with a value for each required argument, so the reference call is known."""
    out = []
    for t in tools:
        fn = t["function"]
        props = (fn.get("parameters") or {}).get("properties") or {}
        args = {k: _example(k, props.get(k) or {}) for k in (fn.get("parameters") or {}).get("required") or []}
        given = ", ".join(f"{k} {json.dumps(v, ensure_ascii=False)}" for k, v in args.items())
        ask = f"Please use {fn['name']}" + (f" with {given}." if given else ".")
        desc = (fn.get("description") or "").strip()
        out.append(ToolPrompt(f"tools schema: {fn['name']}", [{"role": "user", "content": f"{desc} {ask}".strip()}],
                              tools, [{"type": "function", "function": {"name": fn["name"], "arguments": args}}]))
    return out


def prompt_ids(tokenizer: Any, template: str, p: ToolPrompt) -> list[int]:
    """Ids of the prompt with the assistant header, rendered as training renders (tools=, bos rule)."""
    from qlocal.data.formats import Sample
    from qlocal.data.render import chat_inputs, generation_ids

    messages, extra = chat_inputs(Sample(kind="chat", messages=p.messages, where=p.where, tools=p.tools), template)
    if "enable_thinking" in extra:
        extra["enable_thinking"] = p.thinks
    return generation_ids(tokenizer, messages, template, extra)


def _key(call: dict) -> tuple[str, str]:
    fn = call.get("function", call)
    return fn.get("name") or "", json.dumps(fn.get("arguments"), sort_keys=True, ensure_ascii=False)


def score(prompts: list[ToolPrompt], outputs: list[str], tag: str | None) -> dict[str, Any]:
    """The metrics of the module docstring, with counts and the first few failing outputs."""
    from qlocal.tool_calls import check_call, parse

    n = len(prompts)
    valid = json_ok = names = exact = 0
    failures: list[dict[str, Any]] = []
    for p, text in zip(prompts, outputs):
        parsed = parse(text, tag, p.tools, thinking=True)
        problems = list(parsed.errors)
        if not parsed.calls:
            problems.append(f"no tool call found (tag {tag!r})" if tag else "the template renders no tool calls")
        for c in parsed.calls:
            problems += check_call(c, p.tools)
        json_ok += bool(parsed.calls) and not parsed.errors
        valid += not problems
        got, want = sorted(map(_key, parsed.calls)), sorted(map(_key, p.reference))
        names += [k[0] for k in got] == [k[0] for k in want]
        exact += got == want
        if problems and len(failures) < FAILURE_EXAMPLES:
            failures.append({"where": p.where, "output": text[:400], "problems": problems})
    rate = (lambda k: k / n if n else None)
    return {"prompts": n, "tag": tag, "valid": valid, "valid_rate": rate(valid), "valid_json": json_ok,
            "valid_json_rate": rate(json_ok), "name_accuracy": rate(names), "arguments_exact": rate(exact),
            "failures": failures}


def answer(prompts: list[ToolPrompt], ids: list[list[int]], generate: Callable[[list[int]], str],
           tag: str | None, source: str, max_len: int | None = None) -> dict[str, Any]:
    """Generate an answer to each prompt (ids already rendered) and score them; `source` says where
    the prompts came from, recorded with the metrics and a few answers. Prompts longer than
    `max_len` (data.max_seq_len: training cut such chats before the call) are left out, counted."""
    keep = [k for k, i in enumerate(ids) if max_len is None or len(i) <= max_len]
    left_out = len(ids) - len(keep)
    prompts, ids = [prompts[k] for k in keep], [ids[k] for k in keep]
    outputs = [generate(i) for i in ids]
    report = {"source": source, "max_tokens": MAX_TOKENS, "left_out_longer_than_max_seq_len": left_out,
              **score(prompts, outputs, tag)}
    report["examples"] = [{"where": p.where, "output": o[:400]} for p, o in list(zip(prompts, outputs))[:2]]
    return report


def llama_greedy(llm: Any, max_tokens: int = MAX_TOKENS) -> Callable[[list[int]], str]:
    """Greedy text from a llama-cpp-python model, ending at end-of-generation or `max_tokens`,
    special tokens kept (counted in tokens: see qlocal.export.verify._free_greedy for why).

    Prompts are not reset between calls: llama-cpp-python's generate keeps the KV cache of the
    longest prefix shared with the previous prompt (a tool template's preamble, most of each
    prompt) and decodes only the rest; where the cache cannot be cut it re-decodes everything."""
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm.model)

    def run(ids: list[int]) -> str:
        out: list[int] = []
        for t in llm.generate(ids, temp=0.0, top_k=1):
            if len(out) >= max_tokens or llama_cpp.llama_vocab_is_eog(vocab, t):
                break
            out.append(t)
        return llm.detokenize(out, special=True).decode("utf-8", errors="replace")

    return run


def run_prompts(cfg: Any, limit: int) -> tuple[list[ToolPrompt], str]:
    """The prompts an export checks a run with, and where they came from: its held-out chats
    (qlocal.data.split), else its training data's tool schemas; ([], reason) when it has none."""
    from pathlib import Path

    from qlocal.data.split import held_out_samples, run_samples

    from qlocal.hf import looks_like_hub_id

    dc = cfg.data
    for path in (dc.val_path, dc.path):
        if path and not Path(path).exists() and not looks_like_hub_id(path):
            return [], f"the run's data {path} is not found from here (export from where training ran)"
    prompts = prompts_from_samples(held_out_samples(cfg), limit)
    if prompts:
        return prompts, "held-out validation chats"
    samples = run_samples(cfg, dc.path)
    tools: list[dict] = []
    for s in samples:
        for t in getattr(s, "tools", None) or []:
            if t["function"]["name"] not in {x["function"]["name"] for x in tools}:
                tools.append(t)
    if not tools:
        return [], "the run's data declares no tools"
    return schema_prompts(tools)[:limit], "built from the training data's tool schemas (no held-out chats call tools)"


def gguf_tool_calls(path: Any, lora: Any, tokenizer: Any, template: str, prompts: list[ToolPrompt],
                    source: str, max_len: int | None = None) -> dict[str, Any]:
    """Answer `prompts` with a GGUF (+ GGUF LoRA) through llama.cpp, greedy, and score them; the
    prompts are tokenised by the export's HF tokenizer (the GGUF tokenises the same, verify checks)."""
    import os

    from qlocal.llamacpp import load_llama
    from qlocal.tool_calls import template_tag

    ids = [prompt_ids(tokenizer, template, p) for p in prompts]
    longest = max((len(i) for i in ids if max_len is None or len(i) <= max_len), default=0)
    n_ctx = 64 * -(-(longest + MAX_TOKENS + 1) // 64)
    kw: dict[str, Any] = {"n_ctx": n_ctx, "seed": 0, "n_threads": max(1, min(4, os.cpu_count() or 1))}
    if lora is not None:
        kw["lora_path"] = str(lora)
    llm = load_llama(path, **kw)
    try:
        return answer(prompts, ids, llama_greedy(llm), template_tag(template), source, max_len)
    finally:
        llm.close()


def summary_line(report: dict[str, Any]) -> str:
    """One line for the export log: valid calls out of prompts, and where the prompts came from."""
    n = report["prompts"]
    if not n:
        return f"no tool prompt fits data.max_seq_len ({report['left_out_longer_than_max_seq_len']} left out)"
    return (f"tool calls valid on {report['valid']}/{n} prompts ({report['valid_rate']:.0%}; valid JSON "
            f"{report['valid_json_rate']:.0%}, name {report['name_accuracy']:.0%}, arguments exact "
            f"{report['arguments_exact']:.0%}), {report['source']}")


def eval_metrics(scorer: Any, prompts: list[ToolPrompt], max_len: int | None = None) -> dict[str, Any]:
    """`qlocal eval`'s tool metrics for a scorer (a run on its backend, or a GGUF): the flat rates
    its table shows, and the full report under "tool_calls"."""
    from qlocal.tool_calls import template_tag

    ids = [prompt_ids(scorer.tokenizer, scorer.template, p) for p in prompts]
    rep = answer(prompts, ids, lambda i: scorer.greedy(i, MAX_TOKENS), template_tag(scorer.template),
                 "calling turns of the eval data", max_len)
    return {"tool_valid": rep["valid_rate"], "tool_valid_json": rep["valid_json_rate"],
            "tool_name_accuracy": rep["name_accuracy"], "tool_arguments_exact": rep["arguments_exact"],
            "tool_calls": rep}
