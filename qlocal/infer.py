"""Generation from a run (base + adapter, on torch or MLX), a plain HF model, or a GGUF.

Every path uses the template the model was trained with: the run's chat_template.jinja, or the
one written into the GGUF. Prompts are tokenised exactly as qlocal.data.render tokenises training
examples (template text, no extra special tokens, bos added only when the template lacks it), so
what the model sees at inference is what it saw in training.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol, TextIO

from qlocal.errors import UserError, missing_extra
from qlocal.hf import load_tokenizer, pad_id


@dataclass
class Sampling:
    max_tokens: int = 256
    temperature: float = 0.0
    """0 = greedy."""
    top_p: float = 1.0


class Generator(Protocol):
    def chat(self, messages: list[dict[str, str]], sampling: Sampling) -> Iterator[str]:
        """Stream the assistant reply to `messages` piece by piece."""
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


def prompt_ids(tokenizer: Any, template: str, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of `messages` + the assistant header, tokenised as training renders examples."""
    from qlocal.data.render import adds_bos

    text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if adds_bos(tokenizer) and (not ids or ids[0] != tokenizer.bos_token_id):
        ids = [tokenizer.bos_token_id] + ids
    return ids


def hf_stream(model: Any, tokenizer: Any, template: str, messages: list[dict[str, str]],
              sampling: Sampling) -> Iterator[str]:
    """Stream a reply from a transformers (or PEFT) model; generation runs in a thread."""
    from threading import Thread

    import torch
    from transformers import TextIteratorStreamer

    model.eval()  # training code may have left dropout on
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids(tokenizer, template, messages)], device=device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    pad = pad_id(tokenizer)
    kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "streamer": streamer,
                              "max_new_tokens": sampling.max_tokens, "pad_token_id": pad, "use_cache": True,
                              "eos_token_id": stop_token_ids(tokenizer, template)}
    if sampling.temperature > 0:
        kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=None)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with torch.no_grad():
                model.generate(**kwargs)
        except BaseException as e:  # surfaced below, after the streamer ends
            errors.append(e)
            streamer.end()

    thread = Thread(target=run, daemon=True)
    thread.start()
    yield from streamer
    thread.join()
    if errors:
        raise errors[0]


def mlx_stream(model: Any, tokenizer: Any, template: str, messages: list[dict[str, str]],
               sampling: Sampling) -> Iterator[str]:
    """Stream a reply from an mlx-lm model with mlx-lm's stream_generate."""
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    model.eval()
    wrapper = TokenizerWrapper(tokenizer, eos_token_ids=stop_token_ids(tokenizer, template))
    # mlx-lm reads top_p 0 or 1 as "off"; temp 0 is greedy.
    sampler = make_sampler(temp=sampling.temperature, top_p=sampling.top_p if sampling.top_p < 1 else 0.0)
    for resp in stream_generate(model, wrapper, prompt_ids(tokenizer, template, messages),
                                max_tokens=sampling.max_tokens, sampler=sampler):
        if resp.text:
            yield resp.text


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
    cfg: Any = None
    """The run's Config (None for a plain model)."""
    backend: str | None = None
    """The backend the run was trained with."""
    run: Path | None = None


def resolve_hf_source(target: str, chat_template: str | None = None) -> HFSource:
    """A run folder (config.yaml + adapter/) or an HF model folder / hub id / alias."""

    path = Path(target)
    if (path / "config.yaml").is_file():
        from qlocal import rundir

        cfg, resolved = rundir.load_config(path)
        if not (path / "adapter" / "adapter_config.json").is_file():
            raise UserError(f"{path}: has no finished adapter/ yet; finish it with qlocal train --resume {path}")
        base = Path(resolved.get("model_path", ""))
        if not (base / "config.json").is_file():
            raise UserError(f"{path}: its base model {base} is gone; restore it or retrain")
        template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        if chat_template:
            raise UserError(f"{path}: a run answers with the template it trained with; drop --chat-template")
        return HFSource(path.name, base, template, path / "adapter", cfg, resolved.get("backend"), path)
    from qlocal.data.templates import resolve_chat_template
    from qlocal.models import resolve_model

    model = resolve_model(target)
    tokenizer = load_tokenizer(model.path)
    template, _ = resolve_chat_template(tokenizer, chat_template or model.default_chat_template)
    return HFSource(Path(target).name, model.path, template)


def pick_backend(src: HFSource, backend: str | None) -> str:
    """--backend if given; else the run's own backend when its framework is installed; else torch, else MLX."""
    if backend and backend != "auto":
        return backend
    have_torch = importlib.util.find_spec("torch") is not None
    have_mlx = importlib.util.find_spec("mlx_lm") is not None
    if src.backend == "mlx" and have_mlx:
        return "mlx"
    if have_torch:
        return "torch"
    if have_mlx:
        return "mlx"
    raise missing_extra("torch", "torch")


class TorchGenerator:
    """transformers base model (+ the run's PEFT adapter), on CUDA or CPU."""

    def __init__(self, src: HFSource) -> None:
        try:
            import torch
            from transformers import AutoModelForCausalLM
        except ImportError:
            raise missing_extra("torch", "torch") from None

        trust = bool(src.cfg and src.cfg.model.trust_remote_code)
        self.tokenizer = load_tokenizer(src.base_path, trust)
        self.template = src.template
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(str(src.base_path), dtype=dtype, trust_remote_code=trust).to(device)
        if src.adapter is not None:
            import peft

            model = peft.PeftModel.from_pretrained(model, str(src.adapter))
        self.model = model.eval()

    def chat(self, messages: list[dict[str, str]], sampling: Sampling) -> Iterator[str]:
        return hf_stream(self.model, self.tokenizer, self.template, messages, sampling)


# Kept for callers of the first version of this module.
def RunGenerator(run: Path) -> TorchGenerator:  # noqa: N802
    """A torch generator for a run folder."""
    return TorchGenerator(resolve_hf_source(str(run)))


class MLXGenerator:
    """mlx-lm model (quantised as the run was) + the run's PEFT adapter loaded into it."""

    def __init__(self, src: HFSource) -> None:
        from qlocal.backends.mlx_backend import load_mlx_model, load_peft_adapter_into_mlx

        self.tokenizer = load_tokenizer(src.base_path)
        self.template = src.template
        quantize = src.cfg.train.quantize if src.cfg is not None else "none"
        self.model, _ = load_mlx_model(src.base_path, quantize)
        if src.adapter is not None:
            load_peft_adapter_into_mlx(self.model, src.adapter)

    def chat(self, messages: list[dict[str, str]], sampling: Sampling) -> Iterator[str]:
        return mlx_stream(self.model, self.tokenizer, self.template, messages, sampling)


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


_LOG_SINK: Any = None


def silence_llama_logs() -> None:
    """Route llama.cpp's own log lines (printed even with verbose=False, e.g. the SWA cache
    notice) to nowhere: a user asked for an answer, not for llama.cpp's internals."""
    global _LOG_SINK
    if _LOG_SINK is not None:
        return
    import llama_cpp

    _LOG_SINK = llama_cpp.llama_log_callback(lambda level, text, user_data: None)  # kept alive: C holds it
    llama_cpp.llama_log_set(_LOG_SINK, None)


class GGUFGenerator:
    """llama-cpp-python with the chat template embedded in the GGUF."""

    def __init__(self, path: Path, lora: Path | None = None, n_ctx: int = 4096, logits_all: bool = False) -> None:
        try:
            from llama_cpp import Llama
        except ImportError:
            raise missing_extra("llama-cpp-python", "gguf") from None
        # Never beyond the trained context: llama.cpp warns, and the KV cache would be wasted.
        n_ctx = min(n_ctx, gguf_context_length(path) or n_ctx)
        kw: dict[str, Any] = {"model_path": str(path), "n_ctx": n_ctx, "verbose": False, "logits_all": logits_all}
        if lora is not None:
            kw["lora_path"] = str(lora)
        silence_llama_logs()
        self.llm = Llama(**kw)
        self.path = path
        # The GGUF's own template (what export wrote: the run's), never a guessed built-in format.
        if "tokenizer.chat_template" in self.llm.metadata:
            self.llm.chat_format = "chat_template.default"

    def chat(self, messages: list[dict[str, str]], sampling: Sampling) -> Iterator[str]:
        stream = self.llm.create_chat_completion(
            messages=messages, max_tokens=sampling.max_tokens, temperature=sampling.temperature,
            top_p=sampling.top_p, stream=True, seed=0)
        try:
            for chunk in stream:
                piece = chunk["choices"][0]["delta"].get("content")
                if piece:
                    yield piece
        except ValueError as e:
            # llama-cpp-python's two ways of saying the context is full: a prompt longer than n_ctx,
            # or generation running past it.
            if "context window" not in str(e) and "could not broadcast" not in str(e):
                raise
            raise UserError(f"{self.path.name}: the conversation no longer fits the context window "
                            f"(n_ctx={self.llm.n_ctx()}); shorten it (/reset in chat)") from None


def open_generator(target: str, backend: str | None = None, chat_template: str | None = None) -> Generator:
    """A run folder, an export folder, a .gguf file, or an HF model folder / hub id / alias."""
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
    return MLXGenerator(src) if pick_backend(src, backend) == "mlx" else TorchGenerator(src)


def generate_file(gen: Generator, input_file: Path, output: Path, sampling: Sampling) -> int:
    """Batch inference: each input line is {"prompt": ...} or {"messages": [...]}; writes {"response"} added."""
    rows = []
    for n, line in enumerate(input_file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{input_file}:{n}: not valid JSON ({e.msg})") from None
        if isinstance(rec, dict) and isinstance(rec.get("messages"), list):
            messages = rec["messages"]
        elif isinstance(rec, dict) and isinstance(rec.get("prompt"), str):
            messages = [{"role": "user", "content": rec["prompt"]}]
        else:
            raise UserError(f"{input_file}:{n}: expected {{\"prompt\": ...}} or {{\"messages\": [...]}}")
        rows.append({**rec, "response": "".join(gen.chat(messages, sampling))})
    tmp = output.with_name(f".{output.name}.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(output)
    return len(rows)


def chat_loop(gen: Generator, sampling: Sampling, system: str | None = None, stdin: TextIO | None = None,
              out: TextIO | None = None) -> int:
    """Interactive multi-turn chat: one user message per line; /reset clears the history, /exit
    (or end of input) quits. Replies stream to `out`. Returns the number of turns answered."""
    stdin, out = stdin or sys.stdin, out or sys.stdout
    interactive = stdin.isatty()
    base = [{"role": "system", "content": system}] if system else []
    history = list(base)
    if interactive:
        print("type a message; /reset starts over, /exit quits", file=sys.stderr)
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
        reply = []
        try:
            for piece in gen.chat(history, sampling):
                reply.append(piece)
                out.write(piece)
                out.flush()
        except UserError as e:  # e.g. context full: say so, keep the session
            print(f"error: {e}", file=sys.stderr)
            history.pop()
            continue
        out.write("\n")
        out.flush()
        history.append({"role": "assistant", "content": "".join(reply)})
        turns += 1
    return turns
