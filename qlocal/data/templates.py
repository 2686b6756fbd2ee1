"""Chat templates: the model's own by default, named fallbacks, or a user's .jinja file.

The fallbacks live in the chat-family table (qlocal.chat_families) and follow the well-known
originals, so that a GGUF/Ollama export of the template behaves like the model family it names.
`bos_token` is emitted only when the tokenizer has one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qlocal.chat_families import fallbacks
from qlocal.errors import UserError


def _hint() -> str:
    """How to choose a template, naming every fallback in the chat-family table."""
    return f"pass --chat-template {'|'.join(fallbacks())} or a .jinja file"


def resolve_chat_template(tokenizer: Any, choice: str | None) -> tuple[str, str]:
    """Return (template source, name) for the run.

    choice None -> the tokenizer's own template (name "model"); a fallback name -> that template;
    a path ending in .jinja -> the file's contents (name = the path).
    """
    if choice is None or choice == "model":
        own = getattr(tokenizer, "chat_template", None)
        if isinstance(own, dict):  # some tokenizers keep several named templates
            own = own.get("default") or next(iter(own.values()), None)
        if not own:
            model = getattr(tokenizer, "name_or_path", "") or "this model"
            raise UserError(f"model {model} has no chat template; {_hint()}")
        return own, "model"
    if choice.lower().endswith(".jinja"):
        path = Path(choice)
        if not path.is_file():
            raise UserError(f"{choice}: chat template file not found; {_hint()}")
        return path.read_text(encoding="utf-8"), choice
    named = fallbacks().get(choice)
    if named is not None:
        return named, choice
    raise UserError(f"model.chat_template '{choice}' is not known; {_hint()}")
