"""Chat templates: the model's own by default, named fallbacks, or a user's .jinja file.

The fallbacks live in the chat-family table (qlocal.chat_families) and follow the well-known
originals, so that a GGUF/Ollama export of the template behaves like the model family it names.
`bos_token` is emitted only when the tokenizer has one.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from qlocal.chat_families import detect, fallbacks
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
            native = native_fallback(tokenizer)
            if native is not None:  # a base model: the fallback whose markers its vocabulary has
                return fallbacks()[native], native
            model = getattr(tokenizer, "name_or_path", "") or "this model"
            raise UserError(f"model {model} has no chat template and its vocabulary has no family's turn "
                            f"markers; {_hint()} (markers it lacks are added as trained special tokens)")
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


def template_markers(template: str) -> list[str]:
    """The special-token markers a template writes: its family's marker and end-of-turn tokens,
    and every `<|...|>` literal in it, in order of first appearance."""
    fam = detect(template)
    found = [(template.find(t), t) for t in ((fam.marker, *fam.end_of_turn) if fam else ())
             if re.fullmatch(r"<[^<>\s]+>", t) and t in template]
    found += [(m.start(), m.group()) for m in re.finditer(r"<\|[A-Za-z0-9_]+\|>", template)]
    out: list[str] = []
    for _, t in sorted(found):
        if t not in out:
            out.append(t)
    return out


def missing_markers(tokenizer: Any, template: str) -> list[str]:
    """Markers of `template` that are not added tokens of the tokenizer: they would be split into
    pieces, so a model could never emit its end of turn as one token."""
    have = tokenizer.get_added_vocab()
    return [t for t in template_markers(template) if t not in have]


def native_fallback(tokenizer: Any) -> str | None:
    """The first fallback template (table order) whose markers are all special tokens of this
    vocabulary (llama3 for a Llama 3 base, chatml for Qwen, gemma for Gemma); None if none has any."""
    for name, jinja in fallbacks().items():
        if template_markers(jinja) and not missing_markers(tokenizer, jinja):
            return name
    return None


def add_missing_markers(tokenizer: Any, choice: str | None, training: bool = True) -> tuple[list[str], str]:
    """Add the markers of the run's template (`choice` as for resolve_chat_template) that the
    tokenizer lacks as special tokens; returns (added tokens, one line saying what was decided).
    training=False (data check) adds them to this in-memory tokenizer only, to render as training
    will, and the line says what training would do."""
    from qlocal.hf import add_special_tokens

    template, name = resolve_chat_template(tokenizer, choice)
    if name == "model":  # a model's own template fits its own vocabulary
        return [], ""
    line = "" if choice not in (None, "model") else \
        f"the model has no chat template; using {name}, whose turn markers are special tokens of its vocabulary"
    missing = missing_markers(tokenizer, template)
    if missing:
        add_special_tokens(tokenizer, missing)
        did = "added as special tokens" if training else "training adds them as special tokens"
        line = (f"chat template {name}: {', '.join(missing)} not in the vocabulary; {did} "
                "whose embedding and output rows train with the adapter")
    return missing, line
