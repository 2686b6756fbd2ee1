"""llama-cpp-python, opened quietly, and the one place a GGUF that llama.cpp refuses becomes a user error.

llama.cpp prints its own log lines even with verbose=False; qlocal routes them to a callback that
drops them but keeps the last few errors, because when a load fails llama-cpp-python only raises
"Failed to load model from file" and the reason ("unknown pre-tokenizer type: 'gpt2'", "tensor
... has wrong shape") is in the log. A leaf module: llama_cpp is imported inside the functions.
"""

from __future__ import annotations

import collections
import re
from pathlib import Path
from typing import Any

from qlocal.errors import UserError, missing_extra

_ERROR = 4  # ggml_log_level: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5
_CONT = 5
_SINK: Any = None
_ERRORS: collections.deque[str] = collections.deque(maxlen=16)
_last_level = 0


def _on_log(level: int, text: bytes | None, _user_data: Any) -> None:
    global _last_level
    if level != _CONT:
        _last_level = level
    if _last_level == _ERROR and text:
        line = text.decode("utf-8", "replace")
        if level == _CONT and _ERRORS:
            _ERRORS[-1] += line
        else:
            _ERRORS.append(line)


def silence_llama_logs() -> None:
    """Route llama.cpp's own log lines (printed even with verbose=False, e.g. the SWA cache notice)
    away from the terminal: a user asked for an answer, not for llama.cpp's internals. Errors are
    kept for `load_llama`'s message."""
    global _SINK
    if _SINK is not None:
        return
    import llama_cpp

    _SINK = llama_cpp.llama_log_callback(_on_log)  # kept alive: C holds the pointer
    llama_cpp.llama_log_set(_SINK, None)


def llama_reason() -> str:
    """llama.cpp's own words for the last failure, from its error log lines ('' if it logged none)."""
    for line in _ERRORS:
        # "llama_model_load: error loading model: error loading model vocabulary: unknown ..."
        msg = re.sub(r"^\w+: ", "", line.strip())
        msg = re.sub(r"^error loading model: ", "", msg)
        if msg and msg != "failed to load model":
            return msg
    return ""


def load_llama(path: Path, **kw: Any) -> Any:
    """`llama_cpp.Llama(model_path=path, verbose=False, **kw)`, quiet; a file llama.cpp cannot load
    (or a LoRA it cannot apply, a context it cannot make) is a one-line UserError with its reason."""
    try:
        import llama_cpp
    except ImportError:
        raise missing_extra("llama-cpp-python", "gguf") from None
    silence_llama_logs()
    _ERRORS.clear()
    try:
        return llama_cpp.Llama(model_path=str(path), verbose=False, **kw)
    except (ValueError, RuntimeError) as e:
        # llama-cpp-python's load failures all read "Failed to ..."; anything else is a bug of ours.
        msg = str(e)
        if msg.startswith("Model path does not exist"):
            raise UserError(f"{path}: no such GGUF file") from None
        if not msg.startswith("Failed to"):
            raise
        reason = llama_reason() or msg
        if "LoRA" in msg:
            raise UserError(f"{kw.get('lora_path')}: llama.cpp cannot apply this LoRA to {Path(path).name}: "
                            f"{reason}") from None
        raise UserError(f"{path}: llama.cpp cannot load this GGUF: {reason}") from None
