"""Generation from a run (base + adapter with transformers) or a GGUF (llama-cpp-python).

Both use the template the run trained with: the run's chat_template.jinja, or the one written
into the GGUF, so what the model sees at inference is what it saw in training.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol

from qlocal.errors import UserError


@dataclass
class Sampling:
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0


class Generator(Protocol):
    def chat(self, messages: list[dict[str, str]], sampling: Sampling) -> Iterator[str]:
        """Stream the assistant reply to `messages` piece by piece."""
        ...


def find_gguf(target: Path) -> Path | None:
    """A .gguf file, or the preferred model GGUF inside an export folder (smallest quant first)."""
    if target.is_file() and target.suffix == ".gguf":
        return target
    if target.is_dir():
        ggufs = sorted(p for p in target.glob("*.gguf") if "lora" not in p.name)
        if ggufs:
            return min(ggufs, key=lambda p: p.stat().st_size)
    return None


class GGUFGenerator:
    """llama-cpp-python with the chat template embedded in the GGUF."""

    def __init__(self, path: Path, n_ctx: int = 4096) -> None:
        try:
            from llama_cpp import Llama
        except ImportError:
            raise UserError("llama-cpp-python is not installed: pip install 'qlocal[gguf]'") from None
        self.llm = Llama(model_path=str(path), n_ctx=n_ctx, verbose=False)

    def chat(self, messages: list[dict[str, str]], sampling: Sampling) -> Iterator[str]:
        stream = self.llm.create_chat_completion(
            messages=messages, max_tokens=sampling.max_tokens, temperature=sampling.temperature,
            top_p=sampling.top_p, stream=True)
        for chunk in stream:
            piece = chunk["choices"][0]["delta"].get("content")
            if piece:
                yield piece


class RunGenerator:
    """transformers base model + the run's PEFT adapter, on CPU or CUDA."""

    def __init__(self, run: Path) -> None:
        from qlocal import rundir
        from qlocal.train import load_tokenizer

        import peft
        import torch
        from transformers import AutoModelForCausalLM

        cfg, resolved = rundir.load_config(run)
        if not (run / "adapter" / "adapter_config.json").is_file():
            raise UserError(f"{run}: has no finished adapter/ yet; finish it with qlocal train --resume {run}")
        base_path = Path(resolved.get("model_path", ""))
        if not (base_path / "config.json").is_file():
            raise UserError(f"{run}: its base model {base_path} is gone; restore it or retrain")
        self.tokenizer = load_tokenizer(base_path, cfg.model.trust_remote_code)
        self.template = (run / "chat_template.jinja").read_text(encoding="utf-8")
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        base = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=dtype).to(self.device)
        self.model = peft.PeftModel.from_pretrained(base, str(run / "adapter")).eval()

    def chat(self, messages: list[dict[str, str]], sampling: Sampling) -> Iterator[str]:
        from threading import Thread

        from transformers import TextIteratorStreamer

        text = self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                  add_generation_prompt=True)
        enc = self.tokenizer(text, return_tensors="pt", add_special_tokens=False).to(self.device)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs: dict[str, Any] = {**enc, "max_new_tokens": sampling.max_tokens, "streamer": streamer,
                                  "eos_token_id": stop_token_ids(self.tokenizer, self.template)}
        if sampling.temperature > 0:
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        thread = Thread(target=self.model.generate, kwargs=kwargs, daemon=True)
        thread.start()
        yield from streamer
        thread.join()


END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>", "<eos>")


def stop_token_ids(tokenizer: Any, template: str) -> list[int]:
    """eos plus every end-of-turn marker the template writes, so generation ends with the turn."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    for marker in END_OF_TURN:
        if marker in template and marker in vocab:
            ids.add(vocab[marker])
    return sorted(ids)


def open_generator(target: str) -> Generator:
    """A run folder, an export folder or a .gguf file."""
    path = Path(target)
    if not path.exists():
        raise UserError(f"{target}: no such run folder, export folder or .gguf file")
    gguf = find_gguf(path)
    if gguf is not None and not (path / "config.yaml").is_file():
        return GGUFGenerator(gguf)
    if (path / "config.yaml").is_file():
        return RunGenerator(path)
    raise UserError(f"{target}: not a run folder (config.yaml), export folder or .gguf file")


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
