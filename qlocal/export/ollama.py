"""Ollama Modelfile: FROM the GGUF, TEMPLATE translated from the run's chat template, stop set, SYSTEM.

Translation is by family, detected from the markers in the run's Jinja template. The families,
their markers, Go templates and stop strings are the chat-family table (qlocal.chat_families).

Known families get a hand-written Go template in Ollama's `.Messages` style (golden-tested with
Go's own text/template against the Jinja). A tool-calling family (Qwen 2.5/3, Hermes, Llama 3.1,
Mistral v3: .Tools, .ToolCalls, the tool role, .Thinking) is used only when the run's template
renders exactly like the Jinja its TEMPLATE was proven against (export.ollama_probes); a template
that renders tools or reasoning any other way gets no TEMPLATE line rather than one that drops them.
Any other template is *derived*: it is rendered with sentinel messages to find each role's prefix
and suffix, the Go template is built from those pieces, and the pieces are rendered back in Python
and compared with the Jinja output for a multi-turn chat. If that round trip fails, the Modelfile
gets no TEMPLATE line and a comment saying so: Ollama then falls back to the chat template stored
in the GGUF (`tokenizer.chat_template`), which is better than guessing wrong.

BOS is never written in TEMPLATE: llama.cpp adds it itself when the GGUF says add_bos_token.
A template's built-in default system prompt (Qwen's "You are Qwen...") becomes the SYSTEM line, so
Ollama prepends it exactly when the conversation has no system message of its own, as Jinja did.

Modelfile strings: Ollama's parser has no escape sequences. A value is closed by `\"\"\"` (or `\"`)
followed by whitespace, so we pick the quoting that can hold the text and refuse text neither can.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from qlocal import chat_families
from qlocal.errors import UserError

_SENT = {"system": "\x01SYS\x01", "user": "\x01USR\x01", "assistant": "\x01AST\x01", "user2": "\x01US2\x01"}


@dataclass
class ModelfileInfo:
    """What went into a Modelfile: family, stop strings, system prompt and any notes for the user."""

    text: str
    family: str
    stops: list[str]
    system: str | None
    template_source: str
    """"family" (hand-written), "derived" (sentinel round trip) or "gguf" (no TEMPLATE line)."""
    notes: list[str] = field(default_factory=list)


def render_jinja(template: str, messages: list[dict[str, str]], add_generation_prompt: bool,
                 bos_token: str | None = None, eos_token: str | None = None) -> str:
    """Render a chat template the way transformers does (sandboxed jinja2, trim/lstrip blocks)."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg: str) -> None:
        raise jinja2.exceptions.TemplateError(msg)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                            bos_token=bos_token or "", eos_token=eos_token or "")


def default_system(template: str, bos_token: str | None, eos_token: str | None) -> str | None:
    """A system prompt the template inserts when the chat has none (e.g. Qwen 2.5's), else None."""
    user = [{"role": "user", "content": _SENT["user"]}]
    try:
        bare = render_jinja(template, user, False, bos_token, eos_token)
        with_sys = render_jinja(template, [{"role": "system", "content": _SENT["system"]}, *user], False,
                                bos_token, eos_token)
    except Exception:  # noqa: BLE001 - any template error just means "no default we can see"
        return None
    head_bare, head_sys = bare.split(_SENT["user"])[0], with_sys.split(_SENT["user"])[0]
    if _SENT["system"] not in head_sys:
        return None
    pre, post = head_sys.split(_SENT["system"])
    if head_bare.startswith(pre) and head_bare.endswith(post) and len(head_bare) > len(pre) + len(post):
        return head_bare[len(pre):len(head_bare) - len(post)]
    return None


def stop_strings(family: str | None, eos_token: str | None, derived_suffix: str | None = None,
                 template: str | None = None) -> list[str]:
    """Every end-of-turn token text for the family that `template` can write (all of them when no
    template is given), plus the tokenizer's EOS, deduplicated."""
    stops: list[str] = []
    known = chat_families.family(family)
    eots = list(known.stop_strings) if known else []
    if template is not None:  # e.g. <|eom_id|> only where the template writes it (Llama 3.1)
        eots = [t for t in eots if t in template] or eots[:1]
    if not eots and derived_suffix:
        eots = [derived_suffix.strip()]
    for s in (*eots, eos_token):
        if s and s not in stops:
            stops.append(s)
    return stops


def derive_go_template(template: str, bos_token: str | None, eos_token: str | None) -> tuple[str, str] | None:
    """(Go template, assistant suffix) for a simple per-role template, checked by a round trip; else None."""
    def r(msgs: list[dict[str, str]], gen: bool) -> str:
        out = render_jinja(template, msgs, gen, bos_token, eos_token)
        out = out[len(bos_token):] if bos_token and out.startswith(bos_token) else out
        # Phi-3.5/Phi-4-mini end a rendering without a generation prompt with eos (`{% else %}
        # {{ eos_token }}`): a training-only tail that Ollama, always generating, never renders.
        if not gen and eos_tail and out.endswith(eos_token or ""):
            out = out[: len(out) - len(eos_token or "")]
        return out

    eos_tail = False
    probe_u = [{"role": "user", "content": _SENT["user"]}]
    try:
        eos_tail = bool(eos_token) and (
            render_jinja(template, probe_u, False, bos_token, eos_token).endswith(eos_token or "")
            and not render_jinja(template, probe_u, True, bos_token, eos_token).endswith(eos_token or ""))
    except Exception:  # noqa: BLE001 - the checks below give up on this template the same way
        pass

    u = {"role": "user", "content": _SENT["user"]}
    a = {"role": "assistant", "content": _SENT["assistant"]}
    s = {"role": "system", "content": _SENT["system"]}
    try:
        user_only = r([u], False)
        gen = r([u], True)[len(user_only):]
        up, us = user_only.split(_SENT["user"])
        # The assistant's pieces as Ollama renders them: followed by a user turn (OLMo 2's template
        # writes a newline after eos only then; a last assistant turn is training-only text).
        u2 = {"role": "user", "content": _SENT["user2"]}
        mid, tail = r([u, a, u2], False)[len(user_only):], up + _SENT["user2"] + us
        if not mid.endswith(tail):
            return None
        ap, as_ = mid[: len(mid) - len(tail)].split(_SENT["assistant"])
        su = r([s, u], False)
        sp, ss = su[: len(su) - len(user_only)].split(_SENT["system"])
    except Exception:  # noqa: BLE001 - a template we cannot take apart gets no TEMPLATE line
        return None
    pieces = {"system": (sp, ss), "user": (up, us), "assistant": (ap, as_)}

    def py_render(msgs: list[dict[str, str]]) -> str:
        return "".join(pieces[m["role"]][0] + m["content"] + pieces[m["role"]][1] for m in msgs) + gen

    probe = [s, u, a, {"role": "user", "content": _SENT["user2"]}]
    try:
        if py_render(probe) != r(probe, True):
            return None
    except Exception:  # noqa: BLE001
        return None
    g = _go_literal
    go = ("{{- range .Messages }}"
          f"{{{{ if eq .Role \"system\" }}}}{g(sp)}{{{{ .Content }}}}{g(ss)}"
          f"{{{{ else if eq .Role \"user\" }}}}{g(up)}{{{{ .Content }}}}{g(us)}"
          f"{{{{ else if eq .Role \"assistant\" }}}}{g(ap)}{{{{ .Content }}}}{g(as_)}"
          f"{{{{ end }}}}{{{{ end }}}}{g(gen)}")
    return go, as_


def _go_literal(text: str) -> str:
    """Literal text inside a Go template: only `{{` needs escaping."""
    return text.replace("{{", '{{ "{{" }}')


def quote_value(text: str, what: str) -> str:
    """Quote `text` for a Modelfile line so Ollama's parser reads it back unchanged (no escapes exist)."""
    import re

    # A value ends at a closing quote run followed by whitespace (or the end of the file).
    if '"""' not in text:
        return f'"""{text}"""'
    if not re.search(r'"(\s|$)', text) and not text.startswith('""'):
        return f'"{text}"'
    raise UserError(f"{what} contains three double quotes in a row and a quote before whitespace; the "
                    "Modelfile format has no escape for that: rephrase it (e.g. use single quotes)")


def build_modelfile(gguf_file: str, template: str, bos_token: str | None, eos_token: str | None,
                    system: str | None = None, adapter_file: str | None = None) -> ModelfileInfo:
    """Modelfile text for `gguf_file` (relative to the Modelfile) with the run's chat `template`.

    `system` (from --system) wins over a default system prompt built into the template.
    `adapter_file` adds an ADAPTER line (GGUF LoRA applied on top of FROM).
    """
    own_system = default_system(template, bos_token, eos_token)
    if system is None:
        system = own_system
    known = _faithful_tool_family(template, bos_token, eos_token, own_system) or chat_families.detect(template)
    family = known.name if known else None
    notes: list[str] = []
    suffix = None
    # A TEMPLATE that is not proven for tools would drop them (the derived one included): better none.
    if (known is None or known.reference is None) and _renders_tools_or_thinking(template, bos_token, eos_token):
        go, source = "", "gguf"
        notes.append("the chat template renders tools or reasoning and no TEMPLATE qlocal has was proven to "
                     "render it the same; no TEMPLATE line: Ollama will use the chat template stored in the GGUF")
    elif known is not None and known.go_template is not None:
        go = known.go_template.replace("{EOS}", _go_literal(eos_token or ""))
        source = "family"
    else:
        why = "chat template family not recognised" if known is None else f"chat family {family} has no Go template"
        derived = derive_go_template(template, bos_token, eos_token)
        if derived:
            go, suffix = derived
            source = "derived"
            notes.append(f"{why}; TEMPLATE was derived from it by rendering "
                         "sample messages and checked by a round trip")
        else:
            go, source = "", "gguf"
            notes.append(f"{why} and too complex to derive; no TEMPLATE line: "
                         "Ollama will use the chat template stored in the GGUF")
    stops = stop_strings(family, eos_token, suffix, template)
    lines = [f"# Made by qlocal export. Chat family: {family or 'unknown'} (template: {source}).",
             f"FROM ./{gguf_file}"]
    if go and known is not None and known.reference is not None:
        lines.insert(1, "# " + _capabilities(known))
    if adapter_file:
        lines.append(f"ADAPTER ./{adapter_file}")
    if go:
        lines.append(f"TEMPLATE {quote_value(go, 'the chat template')}")
    else:
        lines.append("# No TEMPLATE: " + notes[-1])
    if system:
        lines.append(f"SYSTEM {quote_value(system, 'the system prompt')}")
    for stop in stops:
        short = f'"{stop}"' if '"' not in stop else quote_value(stop, "a stop string")
        lines.append(f"PARAMETER stop {short}")
    return ModelfileInfo("\n".join(lines) + "\n", family or "unknown", stops, system, source, notes)


def _faithful_tool_family(template: str, bos: str | None, eos: str | None,
                          system: str | None) -> chat_families.ChatFamily | None:
    """The tool-calling family whose proven TEMPLATE renders like `template` on every probe chat."""
    candidates = [f for f in chat_families.FAMILIES.values() if f.reference and f.marker in template]
    if not candidates:
        return None
    from qlocal.export.ollama_probes import renders_like

    return next((f for f in candidates if renders_like(template, f.reference or "", bos, eos, system)), None)


def _renders_tools_or_thinking(template: str, bos: str | None, eos: str | None) -> bool:
    from qlocal.export.ollama_probes import renders_thinking, renders_tools

    return renders_tools(template, bos, eos) or renders_thinking(template, bos, eos)


def _capabilities(known: chat_families.ChatFamily) -> str:
    """The Modelfile comment saying what Ollama will find in this TEMPLATE (`ollama show`)."""
    caps = [f"tools (call tag {known.tool_call_tag})"] if known.tool_call_tag else []
    if known.thinking_tags:
        caps.append("thinking ({} ... {})".format(*known.thinking_tags))
    return "Ollama capabilities from this TEMPLATE: " + (", ".join(caps) or "completion only")


def ollama_create(name: str, modelfile_dir: Any, echo: Callable[[str], None] = print) -> bool:
    """Run `ollama create NAME -f Modelfile` in the export folder if ollama is installed, else print it."""
    cmd = ["ollama", "create", name, "-f", "Modelfile"]
    shown = f"cd {modelfile_dir} && ollama create {name} -f Modelfile"
    if shutil.which("ollama") is None:
        echo(f"ollama is not on PATH; to register the model run:\n  {shown}")
        return False
    done = subprocess.run(cmd, cwd=str(modelfile_dir), check=False)
    if done.returncode != 0:
        raise UserError(f"`{shown}` failed (exit {done.returncode}); its output is above")
    return True
