"""What `qlocal eval` scores with: a training backend holding a run (or HF model), or a GGUF in
llama-cpp-python. Both give summed loss over target tokens, greedy answers with how each ended
(`Finish`: tokens, and whether an end-of-generation token came within --max-tokens), and the
tool-call greedy; `close` frees the model before the next one loads (eval --compare-quants).

"Stopped" is decided where generation decides it: the backend's stop ids (eos + the template's
end-of-turn markers, infer.stop_token_ids) for a run, llama.cpp's EOG set of the GGUF's
vocabulary (what stops Ollama and llama-server) for a GGUF. In both the stop token counts
within max_tokens, as transformers' generate, mlx-lm and llama-cpp-python count it.
"""

from __future__ import annotations

import copy
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from qlocal.backends.base import Backend, Finish, Sampling
from qlocal.errors import UserError
from qlocal.infer import GGUFGenerator, HFSource, chat_stream


def drain(stream: Generator[str, None, Finish]) -> tuple[str, Finish]:
    """All of a backend stream's text and its return value (how it ended)."""
    pieces: list[str] = []
    while True:
        try:
            pieces.append(next(stream))
        except StopIteration as end:
            return "".join(pieces), end.value if isinstance(end.value, Finish) else Finish()


def stop_metrics(finishes: list[Finish | None]) -> dict[str, float]:
    """stops: the share of answers that ended their turn within --max-tokens (a model that rambles
    shows < 1.0); answer_tokens: their mean length in tokens, the stop token not counted. Empty
    when some answer's tokens were not seen (a GGUF without a chat template)."""
    if not finishes or any(f is None for f in finishes):
        return {}
    n = len(finishes)
    return {"stops": sum(f.stopped for f in finishes) / n, "answer_tokens": sum(f.tokens for f in finishes) / n}


class BackendScorer:
    """A training backend (torch or MLX) set up as the run was, with the run's adapter loaded."""

    def __init__(self, src: HFSource, backend: Backend) -> None:
        from qlocal import config as config_mod
        from qlocal.hf import load_tokenizer

        cfg = copy.deepcopy(src.cfg) if src.cfg is not None else config_mod.Config()
        cfg.model.name = str(src.base_path)
        cfg.train.grad_checkpointing = False  # no backward pass here
        self.backend = backend
        self.backend_name = backend.name
        backend.setup(src.base_path, cfg)
        self.tokenizer = load_tokenizer(src.base_path, cfg.model.trust_remote_code, cfg.lora.new_tokens)
        self.template = src.template
        self.thinking = src.thinking  # the run's thinking switch, as chat renders it
        self.has_adapter = src.adapter is not None
        if src.adapter is not None:
            backend.load_adapter(src.adapter)
        # A plain model gets LoRA from setup too (B = 0, so it is the base); keep it switched off.
        self.set_base(not self.has_adapter)

    def set_base(self, on: bool) -> None:
        """Switch the adapter off (on=True: the base model) or back on."""
        self.backend.set_adapter_enabled(not on)

    def loss(self, examples: list[Any], batch_size: int) -> tuple[float, int]:
        from qlocal.data.batching import collate
        from qlocal.hf import pad_id

        pad = pad_id(self.tokenizer)
        order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
        batches = [collate([examples[j] for j in order[i:i + batch_size]], pad) for i in range(0, len(order), batch_size)]
        return self.backend.eval_loss(batches)

    def chat(self, messages: list[dict[str, str]], sampling: Sampling) -> Iterator[str]:
        return chat_stream(self.backend, self.tokenizer, self.template, messages, sampling, thinking=self.thinking)

    def answer(self, messages: list[dict[str, str]], max_tokens: int) -> tuple[str, Finish]:
        """The greedy reply to `messages` and how it ended."""
        return drain(self.chat(messages, Sampling(max_tokens=max_tokens, temperature=0.0)))

    def greedy(self, ids: list[int], max_tokens: int) -> str:
        """Greedy reply to prompt ids, special tokens kept (tool-call tags can be special tokens)."""
        from qlocal.infer import stop_token_ids

        stops = stop_token_ids(self.tokenizer, self.template)
        return "".join(self.backend.stream(ids, self.tokenizer, stops, Sampling(max_tokens, keep_special=True)))

    def close(self) -> None:
        """Drop the model (and hand its memory back) before another one loads."""
        from qlocal.memory import release

        self.backend = None  # type: ignore[assignment]
        release()


class GGUFScorer:
    """llama-cpp-python: generation with the GGUF's template; loss from logits on HF-tokenised examples."""

    def __init__(self, gguf: Path, lora: Path | None, n_ctx: int) -> None:
        self.gen = GGUFGenerator(gguf, lora, n_ctx=n_ctx, logits_all=True)
        self.template = self.gen.llm.metadata.get("tokenizer.chat_template")
        fused = gguf.parent / "fused"
        self.tokenizer = None
        if (fused / "tokenizer_config.json").is_file() and self.template:
            from qlocal.hf import load_tokenizer

            self.tokenizer = load_tokenizer(fused)
        self.backend_name = "llama.cpp"

    def set_base(self, on: bool) -> None:
        if on:
            raise UserError("--compare-base needs a run folder (its base is known and the adapter can be "
                            "switched off); for a GGUF, eval the base model separately")

    def loss(self, examples: list[Any], batch_size: int) -> tuple[float, int]:
        llm, total, count = self.gen.llm, 0.0, 0
        for ex in examples:
            llm.reset()
            llm.eval(ex.input_ids)
            logits = np.asarray(llm.scores[: len(ex.input_ids)], dtype=np.float64)[:-1]
            m = logits.max(axis=-1, keepdims=True)
            logp = logits - (m + np.log(np.exp(logits - m).sum(axis=-1, keepdims=True)))
            for t in range(len(ex.input_ids) - 1):
                if ex.loss_mask[t + 1]:
                    total -= float(logp[t, ex.input_ids[t + 1]])
                    count += 1
        return total, count

    def chat(self, messages: list[dict[str, str]], sampling: Sampling) -> Iterator[str]:
        return self.gen.chat(messages, sampling)

    def answer(self, messages: list[dict[str, str]], max_tokens: int) -> tuple[str, Finish | None]:
        """llama.cpp's greedy reply to `messages` and how it ended: an EOG token of the GGUF's
        vocabulary within `max_tokens` (and the context), as llama-cpp-python's completion stops.
        None for how it ended when the file has no chat template (llama-cpp-python's handler answers)."""
        import llama_cpp

        from qlocal.infer import gguf_prompt_ids, prompt_ids

        llm = self.gen.llm
        if not self.template:
            return "".join(self.gen.chat(messages, Sampling(max_tokens=max_tokens, temperature=0.0))), None
        # The render loss scores (HF tokenizer) where fused/ has it, else the GGUF's own tokenizer.
        ids = (prompt_ids(self.tokenizer, self.template, messages) if self.tokenizer is not None
               else gguf_prompt_ids(llm, self.template, messages))
        budget = max(0, min(max_tokens, llm.n_ctx() - len(ids)))
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        out: list[int] = []
        finish = Finish()
        if budget:
            for t in llm.generate(ids, temp=0.0, top_k=1):
                if llama_cpp.llama_vocab_is_eog(vocab, t):
                    finish.stopped = True
                    break
                out.append(t)
                if len(out) >= budget:
                    break
        finish.tokens = len(out)
        # Text as llama-cpp-python's completion gives it: special tokens dropped.
        return llm.detokenize(out).decode("utf-8", errors="replace"), finish

    def greedy(self, ids: list[int], max_tokens: int) -> str:
        """llama.cpp's greedy reply to prompt ids, special tokens kept, within the context."""
        from qlocal.tool_eval import llama_greedy

        return llama_greedy(self.gen.llm, max(0, min(max_tokens, self.gen.llm.n_ctx() - len(ids))))(ids)

    def close(self) -> None:
        """Unmap the file (llama.cpp maps all of it) before the next one loads."""
        from qlocal.memory import release

        self.gen.llm.close()
        release()
