"""The torch backend outside the training step: a base (+ PEFT adapter) loaded for inference,
adapter weights loaded into a set-up model, the adapter switch, and streamed generation."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Generator

from qlocal.backends.base import Finish, Sampling
from qlocal.errors import UserError, missing_extra
from qlocal.hf import pad_id


def load_model(model_path: Path, adapter: Path | None, trust_remote_code: bool) -> tuple[Any, str]:
    """(model in eval mode, device): the 16-bit base (bf16 on CUDA, fp32 on CPU) + the adapter.

    A QLoRA adapter applies to the 16-bit original too; the 4-bit weights are only a training
    memory saving.
    """
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise missing_extra("torch", "torch") from None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=dtype, trust_remote_code=trust_remote_code)
    model = model.to(device)
    if adapter is not None:
        import peft

        from qlocal.adapters import fit_vocab

        fit_vocab(model, adapter)
        model = peft.PeftModel.from_pretrained(model, str(adapter))
    return model.eval(), device


def load_adapter(model: Any, path: Path, device: str) -> None:
    """Copy a PEFT adapter folder's weights into the PEFT model's existing LoRA layers."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(str(path / "adapter_model.safetensors"), device=device)
    result = set_peft_model_state_dict(model, weights)
    if result.unexpected_keys:
        raise UserError(f"{path}: adapter does not fit the run's base model (unexpected {result.unexpected_keys[0]})")


def set_adapter_enabled(model: Any, enabled: bool) -> None:
    """PEFT's own switch: disabled LoRA layers skip the adapter branch, so the output is the base's."""
    import peft

    if not isinstance(model, peft.PeftModel):
        return  # a plain model loaded for inference: there is no adapter to switch
    if enabled:
        model.base_model.enable_adapter_layers()
    else:
        model.base_model.disable_adapter_layers()


def stream(model: Any, tokenizer: Any, prompt: list[int], stop_ids: list[int],
           sampling: Sampling) -> Generator[str, None, Finish]:
    """Stream a reply from a transformers (or PEFT) model; generation runs in a thread. Returns
    how it ended: generate counts the stop token within max_new_tokens, as mlx-lm and llama.cpp do."""
    from threading import Thread

    import torch
    from transformers import TextIteratorStreamer

    model.eval()  # training code may have left dropout on
    device = next(model.parameters()).device
    ids = torch.tensor([prompt], device=device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=not sampling.keep_special)
    kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "streamer": streamer,
                              "max_new_tokens": sampling.max_tokens, "pad_token_id": pad_id(tokenizer),
                              "use_cache": True, "eos_token_id": stop_ids}
    if sampling.temperature > 0:
        kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=None)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    errors: list[BaseException] = []
    finish = Finish()

    def run() -> None:
        try:
            with torch.no_grad():
                out = model.generate(**kwargs)
            # a generation_config with return_dict_in_generate hands back an output object
            new = getattr(out, "sequences", out)[0, len(prompt):].tolist()
            finish.stopped = bool(new) and new[-1] in stop_ids
            finish.tokens = len(new) - finish.stopped
        except BaseException as e:  # surfaced below, after the streamer ends
            errors.append(e)
            streamer.end()

    thread = Thread(target=run, daemon=True)
    thread.start()
    yield from streamer
    thread.join()
    if errors:
        raise errors[0]
    return finish
