"""Export a run: fuse the adapter, convert to GGUF, quantise, verify, write an Ollama Modelfile.

Heavy imports stay inside the submodules' functions so `import qlocal.export` is cheap.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def convert_hf_to_gguf(hf_dir: Path, out_path: Path, outtype: str = "f16",
                       chat_template: str | None = None, name: str | None = None,
                       pretokenizer: Any = None, allow_tokenizer_mismatch: bool = False,
                       tensors: dict[str, Any] | None = None) -> Path:
    """HF safetensors folder -> GGUF (f32|f16|bf16|q8_0); `tensors` (merged fp32 weights) replace the
    folder's. See qlocal.export.gguf."""
    from qlocal.export.gguf import convert_hf_to_gguf as convert

    return convert(hf_dir, out_path, outtype=outtype, chat_template=chat_template, name=name,
                   pretokenizer=pretokenizer, allow_tokenizer_mismatch=allow_tokenizer_mismatch, tensors=tensors)


def convert_lora_to_gguf(adapter_dir: Path, base_hf_dir: Path, out_path: Path) -> Path:
    """PEFT adapter folder -> GGUF LoRA adapter for the base model's GGUF. See qlocal.export.gguf_lora."""
    from qlocal.export.gguf_lora import convert_lora_to_gguf as convert

    return convert(adapter_dir, base_hf_dir, out_path)


__all__ = ["convert_hf_to_gguf", "convert_lora_to_gguf"]
