"""Hugging Face helpers every part of qlocal shares (tokenizer loading, quiet logging, pad id, hub ids).

A leaf module: it imports nothing of qlocal's own, so the trainer, backends, export and inference
can all use it without importing each other.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

# `org/name` as the Hub accepts it for models and datasets: each part starts with a letter or digit.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def looks_like_hub_id(name: str) -> bool:
    """True for `org/name` that is not a local path: `models/foo` is a hub id by shape, but when a
    local `models/` folder exists the user meant a path."""
    return bool(_HUB_ID.match(name)) and not Path(name.split("/", 1)[0]).is_dir()


def quiet_bitsandbytes() -> None:
    """bitsandbytes (imported by peft) logs a warning on CPUs with AVX512-BF16 when the optional
    `kernels` package is absent; it changes nothing and would break one-line errors."""
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def quiet_transformers() -> None:
    """Hide transformers' loading bars and deprecation chatter; our own progress is what users read."""
    import warnings

    quiet_bitsandbytes()

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\..*")
    warnings.filterwarnings("ignore", message=r".*(use_reentrant|is_gradient_checkpointing|gradient_checkpointing_enable).*")


def load_tokenizer(path: Path, trust_remote_code: bool = False, added: Sequence[str] = ()) -> Any:
    """The base model's HF tokenizer (shared by every backend), with a run's `added` special tokens
    (config `lora.new_tokens`) appended in order, so their ids are the same wherever it is loaded."""
    from transformers import AutoTokenizer

    quiet_transformers()
    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    add_special_tokens(tok, added)
    return tok


def add_special_tokens(tokenizer: Any, tokens: Sequence[str]) -> list[int]:
    """Add `tokens` the vocabulary lacks as special tokens (matched before pre-tokenisation, never
    split, skipped when decoding); returns the ids of all of `tokens`."""
    from tokenizers import AddedToken

    missing = [t for t in tokens if t not in tokenizer.get_added_vocab()]
    if missing:
        tokenizer.add_special_tokens(
            {"additional_special_tokens": [AddedToken(t, special=True, normalized=False) for t in missing]},
            replace_extra_special_tokens=False)
    return [int(tokenizer.convert_tokens_to_ids(t)) for t in tokens]


def pad_id(tokenizer: Any) -> int:
    """The id padding uses: the tokenizer's pad token, else its eos, else 0.

    Padded positions never carry loss and sit after every real token, so any id works; a real
    token id keeps embeddings lookups in range.
    """
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return int(tokenizer.eos_token_id or 0)
