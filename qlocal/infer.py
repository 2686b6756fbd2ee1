"""Generation from a run (base + adapter, on torch or MLX), a plain HF model, or a GGUF.

Every path uses the template the model was trained with: the run's chat_template.jinja, or the
one written into the GGUF. Prompts are tokenised exactly as qlocal.data.render tokenises training
examples (template text, no extra special tokens, bos added only when the template lacks it), so
what the model sees at inference is what it saw in training.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol, TextIO

from qlocal import atomic
from qlocal.backends.base import Backend, Sampling
from qlocal.config import Config
from qlocal.errors import UserError
from qlocal.hf import load_tokenizer, quiet_bitsandbytes


class Generator(Protocol):
    template: str | None
    """The Jinja chat template it renders with (the run's, or the GGUF's)."""

    def chat(self, messages: list[dict[str, Any]], sampling: Sampling, tools: list[dict] | None = None) -> Iterator[str]:
        """Stream the assistant reply to `messages` (with `tools` rendered by the template) piece by piece."""
        ...


def stop_token_ids(tokenizer: Any, template: str) -> list[int]:
    """eos plus every end-of-turn marker the template writes, so generation ends with the turn."""
    from qlocal.chat_families import EOS_TEXTS, end_of_turn_tokens

    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    for marker in (*end_of_turn_tokens(), *EOS_TEXTS):
        if marker in template and marker in vocab:
            ids.add(vocab[marker])
    return sorted(ids)


def prompt_ids(tokenizer: Any, template: str, messages: list[dict[str, Any]], tools: list[dict] | None = None,
               thinking: bool | None = None) -> list[int]:
    """Token ids of `messages` (+ `tools`) + the assistant header: the messages and tools read and
    handed to the template as training reads and renders a record (data.render.conversation_inputs),
    tokenised as training tokenises it. `thinking`: the run's thinking switch (see there)."""
    from qlocal.data.render import conversation_inputs, generation_ids

    msgs, extra = conversation_inputs(messages, tools, template, thinking=thinking)
    return generation_ids(tokenizer, msgs, template, extra)


def gguf_prompt_ids(llm: Any, template: str, messages: list[dict[str, Any]], tools: list[dict] | None = None,
                    thinking: bool | None = None, prefill: str = "") -> list[int]:
    """`prompt_ids` for a GGUF opened in llama-cpp-python (no HF tokenizer): the same messages and
    template variables, transformers' renderer, llama.cpp's tokenizer and the same bos rule.
    `prefill` is text written after the generation prompt (a forced tool-call tag)."""
    from qlocal.data.render import conversation_inputs, generation_text

    def text(tok: int) -> str:
        return llm.detokenize([tok], special=True).decode("utf-8", "replace") if tok >= 0 else ""

    msgs, extra = conversation_inputs(messages, tools, template, thinking=thinking)
    # Only the tokens the GGUF names: llama.cpp reports a default bos id for a vocabulary without one
    # (Qwen's), where the HF tokenizer has none and the template renders bos_token as "".
    meta = llm.metadata
    bos = llm.token_bos() if "tokenizer.ggml.bos_token_id" in meta else -1
    named = {"bos_token": bos, "eos_token": llm.token_eos() if "tokenizer.ggml.eos_token_id" in meta else -1}
    rendered = generation_text(msgs, template, extra, {k: text(t) for k, t in named.items() if t >= 0})
    ids = list(llm.tokenize((rendered + prefill).encode("utf-8"), add_bos=False, special=True))
    adds_bos = bos >= 0 and llm.tokenize(b"a", add_bos=True, special=False)[:1] == [bos]  # render.adds_bos
    if adds_bos and (not ids or ids[0] != bos):  # render's rule: the template's bos, else the tokenizer's
        ids = [bos] + ids
    return ids


# --------------------------------------------------------------------------------------------
# What a target is


@dataclass
class HFSource:
    """A run folder or plain HF model, resolved: base folder, adapter, template, run config."""

    name: str
    base_path: Path
    template: str
    adapter: Path | None = None
    """The run's adapter/ folder (PEFT); None for a plain model."""
    cfg: Config | None = None
    """The run's Config (None for a plain model)."""
    run: Path | None = None
    thinking: bool | None = None
    """Whether the run's data reasons (its template's thinking switch as training set it); None: unknown."""


def resolve_hf_source(target: str, chat_template: str | None = None) -> HFSource:
    """A run folder (config.yaml + adapter/) or an HF model folder / hub id / alias."""
    from qlocal import rundir

    path = Path(target)
    rundir.check_exists(target)
    if (path / "config.yaml").is_file():
        cfg, resolved = rundir.load_config(path)
        rundir.check_finished(path)
        base = Path(resolved.get("model_path", ""))
        if not (base / "config.json").is_file():
            raise UserError(f"{path}: its base model {base} is gone; restore it or retrain")
        template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        if chat_template:
            raise UserError(f"{path}: a run answers with the template it trained with; drop --chat-template")
        return HFSource(path.name, base, template, path / "adapter", cfg, path, resolved.get("data_reasoning"))
    from qlocal.data.templates import resolve_chat_template
    from qlocal.models import resolve_model

    model = resolve_model(target)
    tokenizer = load_tokenizer(model.path)
    template, _ = resolve_chat_template(tokenizer, chat_template or model.default_chat_template)
    return HFSource(Path(target).name, model.path, template)


def chat_stream(backend: Backend, tokenizer: Any, template: str, messages: list[dict[str, Any]],
                sampling: Sampling, tools: list[dict] | None = None, thinking: bool | None = None) -> Iterator[str]:
    """Stream the assistant reply to `messages` from a backend holding a model (+ adapter)."""
    return backend.stream(prompt_ids(tokenizer, template, messages, tools, thinking), tokenizer,
                          stop_token_ids(tokenizer, template), sampling)


def open_backend(requested: str | None) -> Backend:
    """The backend chat, generate and eval run on: the rule train uses (backends.select)."""
    from qlocal.backends.select import create_backend, select_backend

    quiet_bitsandbytes()  # peft imports bitsandbytes when the model loads; its kernels warning is noise here
    return create_backend(select_backend(requested or "auto")[0])


class BackendGenerator:
    """A run's base + PEFT adapter (or a plain HF model) loaded for inference on a backend."""

    def __init__(self, src: HFSource, backend: Backend) -> None:
        cfg = src.cfg if src.cfg is not None else Config()
        self.backend = backend
        self.tokenizer = load_tokenizer(src.base_path, cfg.model.trust_remote_code, cfg.lora.new_tokens)
        self.template = src.template
        self.thinking = src.thinking
        backend.load_for_inference(src.base_path, src.adapter, cfg)

    def chat(self, messages: list[dict[str, Any]], sampling: Sampling, tools: list[dict] | None = None) -> Iterator[str]:
        return chat_stream(self.backend, self.tokenizer, self.template, messages, sampling, tools, self.thinking)


def find_gguf(target: Path) -> tuple[Path, Path | None] | None:
    """(model GGUF, GGUF LoRA or None) for a .gguf file or an export folder, else None.

    An export folder's export.json names its files (an --adapter-only export has base-*.gguf +
    adapter.gguf); otherwise the smallest non-adapter GGUF in the folder is the model.
    """
    if target.is_file() and target.suffix == ".gguf":
        return target, None
    if not target.is_dir():
        return None
    summary = target / "export.json"
    if summary.is_file():
        info = json.loads(summary.read_text(encoding="utf-8"))
        first = next(iter((info.get("files") or {}).values()), None)
        if first and (target / first["file"]).is_file():
            adapter = (info.get("adapter") or {}).get("file")
            return target / first["file"], (target / adapter) if adapter else None
    ggufs = [p for p in target.glob("*.gguf") if "lora" not in p.name and p.name != "adapter.gguf"]
    return (min(ggufs, key=lambda p: p.stat().st_size), None) if ggufs else None


def gguf_context_length(path: Path) -> int | None:
    """The context length a GGUF was trained with (its metadata), or None when not recorded."""
    try:
        from gguf import GGUFReader

        fields = GGUFReader(str(path)).fields
        arch = fields["general.architecture"].contents()
        return int(fields[f"{arch}.context_length"].contents())
    except Exception:  # an older gguf package or an odd file: llama.cpp will say what it thinks
        return None


class ContextFull(UserError):
    """A conversation outgrew a GGUF's context window; the message advises chat, `for_generate` generate."""

    def __init__(self, name: str, n_ctx: int) -> None:
        self.name, self.n_ctx = name, n_ctx
        super().__init__(f"{name}: the conversation no longer fits the context window (n_ctx={n_ctx}); "
                         "shorten it (/reset in chat)")

    def for_generate(self, where: str) -> UserError:
        """The same fact for one generate prompt: `where` names the record (file:line) or --prompt."""
        return UserError(f"{where}: the prompt and its answer do not fit {self.name}'s context window "
                         f"(n_ctx={self.n_ctx}); shorten the prompt or lower --max-tokens")


class GGUFGenerator:
    """llama-cpp-python with the chat template embedded in the GGUF."""

    def __init__(self, path: Path, lora: Path | None = None, n_ctx: int = 4096, logits_all: bool = False) -> None:
        from qlocal.llamacpp import load_llama

        # Never beyond the trained context: llama.cpp warns, and the KV cache would be wasted.
        n_ctx = min(n_ctx, gguf_context_length(path) or n_ctx)
        kw: dict[str, Any] = {"n_ctx": n_ctx, "logits_all": logits_all}
        if lora is not None:
            kw["lora_path"] = str(lora)
        self.llm = load_llama(path, **kw)  # a file llama.cpp refuses is a one-line UserError
        self.path = path
        # The GGUF's own template (what export wrote: the run's), never a guessed built-in format.
        self.template = self.llm.metadata.get("tokenizer.chat_template")
        if self.template:
            self.llm.chat_format = "chat_template.default"

    def chat(self, messages: list[dict[str, Any]], sampling: Sampling, tools: list[dict] | None = None) -> Iterator[str]:
        # The prompt is rendered as training rendered it (gguf_prompt_ids), not by llama-cpp-python's
        # chat handler (raw messages, no bos rule, no thinking switch); calls come back as text,
        # which qlocal.tool_chat splits with the template's tag.
        if not self.template:
            stream = self.llm.create_chat_completion(
                messages=messages, max_tokens=sampling.max_tokens, temperature=sampling.temperature,
                top_p=sampling.top_p, stream=True, seed=0)
            pieces = (chunk["choices"][0]["delta"].get("content") for chunk in stream)
        else:
            eos = self.llm.detokenize([self.llm.token_eos()], special=True).decode("utf-8", "replace")
            ids = gguf_prompt_ids(self.llm, self.template, messages, tools)
            stream = self.llm.create_completion(
                prompt=ids, max_tokens=sampling.max_tokens, temperature=sampling.temperature,
                top_p=sampling.top_p, stream=True, seed=0, stop=[eos] if eos else None)
            pieces = (chunk["choices"][0]["text"] for chunk in stream)
        try:
            for piece in pieces:
                if piece:
                    yield piece
        except ValueError as e:
            # llama-cpp-python's two ways of saying the context is full: a prompt longer than n_ctx,
            # or generation running past it.
            if "context window" not in str(e) and "could not broadcast" not in str(e):
                raise
            raise ContextFull(self.path.name, self.llm.n_ctx()) from None


def check_target(target: str) -> None:
    """Raise what opening `target` would refuse, found without loading, converting or downloading
    a model: a mistyped run or export path, an unfinished run, an export with no GGUF, a file that
    is no GGUF, a model name of no kind. Commands run it before reading their data files."""
    from qlocal import rundir
    from qlocal.models import check_model_name

    path = Path(target)
    if (path / "config.yaml").is_file():
        resolve_hf_source(target)  # a run: its config, adapter, base and template, all cheap
        return
    if find_gguf(path) is not None:
        return
    rundir.check_exists(target)
    if target.endswith(".gguf") and not path.exists():
        raise UserError(f"{target}: no such file; give a .gguf file, or the export folder that holds one")
    if path.is_file():
        raise UserError(f"{target}: not a run folder (config.yaml), export folder, HF model folder or .gguf file")
    if (path / "export.json").is_file() and not (path / "config.json").is_file():
        fused = f"{path / 'fused'} (an HF model folder), " if (path / "fused" / "config.json").is_file() else ""
        raise UserError(f"{target}: an export folder with no GGUF in it; give {fused}the run it came from, "
                        "or export again with --gguf")
    check_model_name(target)


def open_generator(target: str, backend: str | None = None, chat_template: str | None = None) -> Generator:
    """A run folder, an export folder, a .gguf file, or an HF model folder / hub id / alias."""
    check_target(target)
    path = Path(target)
    if path.exists() and not (path / "config.yaml").is_file():
        found = find_gguf(path)
        if found is not None:
            if backend not in (None, "auto"):
                raise UserError(f"{target}: a GGUF runs on llama-cpp-python; drop --backend {backend}")
            return GGUFGenerator(*found)
    if path.exists() and path.is_file():
        raise UserError(f"{target}: not a run folder (config.yaml), export folder, HF model folder or .gguf file")
    src = resolve_hf_source(target, chat_template)
    return BackendGenerator(src, open_backend(backend))


def _records(input_file: Path) -> Iterator[tuple[str, dict, list[dict]]]:
    """(where, record, messages) of each line of a generate input file."""
    from qlocal.tool_calls import template_message

    for n, line in enumerate(input_file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{input_file}:{n}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not valid JSON ({e.msg})") from None
        if isinstance(rec, dict) and isinstance(rec.get("messages"), list):
            try:
                messages = [template_message(m, f"messages[{i}]") for i, m in enumerate(rec["messages"])]
            except ValueError as e:
                raise UserError(f"{where}: {e}") from None
        elif isinstance(rec, dict) and isinstance(rec.get("prompt"), str):
            messages = [{"role": "user", "content": rec["prompt"]}]
        else:
            raise UserError(f"{where}: expected {{\"prompt\": ...}} or {{\"messages\": [...]}}")
        yield where, rec, messages


def check_inputs(input_file: Path) -> None:
    """Read every line of a generate input file (a bad one is named), before any model loads."""
    from qlocal.tool_calls import check_tools

    for where, rec, _ in _records(input_file):
        try:
            check_tools(rec.get("tools"))
        except ValueError as e:
            raise UserError(f"{where}: {e}") from None


def generate_file(gen: Generator, input_file: Path, output: Path, sampling: Sampling,
                  tools: list[dict] | None = None) -> int:
    """Batch inference: each input line is {"prompt": ...} or {"messages": [...]}; writes {"response"} added.

    With tools (a record's own `tools`, else `tools`, the --tools file) the template renders them and
    each row also gets `tool_calls`: the calls the answer makes ([] for none), `response` the rest.
    """
    from qlocal.tool_calls import check_tools
    from qlocal.tool_chat import assistant_turn, tool_tag

    rows = []
    for where, rec, messages in _records(input_file):
        try:
            own = check_tools(rec.get("tools"))
        except ValueError as e:
            raise UserError(f"{where}: {e}") from None
        schemas = own or tools
        try:
            if not schemas:
                rows.append({**rec, "response": "".join(gen.chat(messages, sampling))})
                continue
            msg = assistant_turn(gen, messages, sampling, schemas, tool_tag(gen, schemas, where))
        except ContextFull as e:
            raise e.for_generate(where) from None
        rows.append({**rec, "response": msg["content"], "tool_calls": msg.get("tool_calls", [])})
    atomic.write_text(output, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return len(rows)


def _results(calls: list[dict], stdin: TextIO, interactive: bool) -> list[dict] | None:
    """One line per call from the user: the tool's result (None at end of input)."""
    results = []
    for call in calls:
        if interactive:
            print(f"result of {call['function']['name']}> ", end="", file=sys.stderr, flush=True)
        line = stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            return None
        results.append({"role": "tool", "tool_call_id": call["id"], "name": call["function"]["name"],
                        "content": line.rstrip("\n")})
    return results


def chat_loop(gen: Generator, sampling: Sampling, system: str | None = None, stdin: TextIO | None = None,
              out: TextIO | None = None, tools: list[dict] | None = None) -> int:
    """Interactive multi-turn chat: one user message per line; /reset clears the history, /exit
    (or end of input) quits. Replies stream to `out`. With `tools`, each call the model makes is
    shown ([tool call] name {arguments}) and the next line is its result, which the model then
    answers. Returns the number of turns answered."""
    from qlocal.tool_chat import assistant_turn, tool_tag

    stdin, out = stdin or sys.stdin, out or sys.stdout
    interactive = stdin.isatty()
    tag = tool_tag(gen, tools, "--tools")
    base = [{"role": "system", "content": system}] if system else []
    history = list(base)
    if interactive:
        print("type a message; /reset starts over, /exit quits"
              + ("; after a tool call, type its result" if tools else ""), file=sys.stderr)
    turns = 0
    while True:
        if interactive:
            print(">>> ", end="", file=sys.stderr, flush=True)
        line = stdin.readline()
        if not line:
            break
        text = line.rstrip("\n")
        if text.strip() in ("/exit", "/quit"):
            break
        if text.strip() == "/reset":
            history = list(base)
            print("(history cleared)", file=sys.stderr)
            continue
        if not text.strip():
            continue
        history.append({"role": "user", "content": text})
        mark = len(history)
        while True:  # the model answers; each round of calls gets its results and the model goes on
            try:
                reply = assistant_turn(gen, history, sampling, tools, tag, out)
            except UserError as e:  # e.g. context full: say so, keep the session
                print(f"error: {e}", file=sys.stderr)
                del history[mark - 1:]
                break
            history.append(reply)
            if not reply.get("tool_calls"):
                out.write("\n")
                out.flush()
                turns += 1
                break
            results = _results(reply["tool_calls"], stdin, interactive)
            if results is None:
                return turns
            history += results
    return turns
