"""One table of chat families: everything qlocal knows about a chat format, in one place.

Each `ChatFamily` says how to recognise the format in a Jinja chat template (`marker`), which
special tokens close a turn (`end_of_turn`), the fallback Jinja template `--chat-template NAME`
uses, the Go template written as the Ollama Modelfile's TEMPLATE, and the Modelfile's stop
strings. Readers, all of which look the table up when called (so a family added here, or by a
test's monkeypatch, reaches every one of them):

    data.templates     --chat-template NAME -> `jinja`; the names listed in error hints
    data.render        `end_of_turn` tokens trained after an assistant turn the template hides
    export.ollama      `marker` -> family; `go_template` -> TEMPLATE; `stops` -> PARAMETER stop;
                       `reference` -> whether a tool family's TEMPLATE fits the run's template
    export.gguf_vocab  the first `end_of_turn` token in the vocab -> tokenizer.ggml.eot_token_id
    infer              every `end_of_turn` token the template writes ends generation

Readers take the fields they need by name, and every field after the first few has a default, so
a new field (issue 15: tool-call tag, thinking tags) is one line here plus the reader that uses it.

Adding a family:
  1. Append a `ChatFamily` to `_TABLE` below. Detection takes the first family whose marker the
     template contains, so put a family whose marker contains another's before it. Write
     `go_template` in Ollama's `.Messages` style; `{EOS}` stands for the tokenizer's eos text.
  2. Golden files: add a case to CASES in tests/test_ollama.py (a tokenizer asset's own template,
     or this fallback) and run `QLOCAL_UPDATE_GOLDEN=1 pytest tests/test_ollama.py` to write
     tests/golden/<case>.Modelfile; review it. The same file renders the TEMPLATE with Go's own
     text/template (tests/gotemplate) and compares it byte for byte with the Jinja on every shape
     of qlocal.export.ollama_probes, and tests/test_render.py checks the fallback's masking on
     every tokenizer asset by itself.
A model's tool-calling format (tools, calls, results, reasoning): put its Jinja template in
qlocal/ollama_templates/NAME.jinja (and its test fixture), write NAME.gotmpl there (the shared JSON
printers of _json.gotmpl come first), and add a family with `reference`, `tool_call_tag` (what
Ollama's parser will look for: the first text inside `{{ if .ToolCalls }}`, cut at `{`) and
`thinking_tags` at the end of the table, so detect() still names the generic family.
A format known only by its end token (no faithful fallback or Go template written yet) goes in
`OTHER_END_OF_TURN`, so the GGUF, inference and training still stop there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

_OLLAMA = Path(__file__).resolve().parent / "ollama_templates"


def _ollama(name: str) -> tuple[str, str]:
    """(Go TEMPLATE, reference Jinja) of qlocal/ollama_templates/NAME; _json.gotmpl holds the
    shared defines that print JSON the way Python's json.dumps does (transformers' tojson)."""
    def read(file: str) -> str:
        return (_OLLAMA / file).read_text(encoding="utf-8")

    return read("_json.gotmpl") + read(f"{name}.gotmpl"), read(f"{name}.jinja")


@dataclass(frozen=True, kw_only=True)
class ChatFamily:
    """What qlocal knows about one chat format (see the module docstring for who reads what)."""

    name: str
    """The --chat-template name and the name in Modelfile comments."""
    marker: str
    """Text only this family's Jinja templates contain; finds the family of a model's template."""
    end_of_turn: tuple[str, ...] = ()
    """Special tokens that close a turn (besides the tokenizer's eos, which every family stops on)."""
    jinja: str | None = None
    """Fallback chat template for --chat-template NAME; None = the family is only recognised."""
    go_template: str | None = None
    """Ollama TEMPLATE (`{EOS}` = the eos text); None = derived from the Jinja by export.ollama."""
    stops: tuple[str, ...] | None = None
    """Modelfile stop strings before the eos; None = the end_of_turn tokens."""
    tool_call_tag: str | None = None
    """(issue 15) Tag that opens a tool call in assistant text, e.g. "<tool_call>"."""
    thinking_tags: tuple[str, str] | None = None
    """(issue 15) Open and close tags around reasoning text, e.g. ("<think>", "</think>")."""
    reference: str | None = None
    """A model's own Jinja template that `go_template` was proven against with Go's text/template
    (tests/test_ollama.py); export uses this family only for a template that renders like it."""

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """Stop strings for Ollama, before the tokenizer's eos."""
        return self.end_of_turn if self.stops is None else self.stops


_TABLE = [
    ChatFamily(  # Qwen 2/2.5/3 and many fine-tunes
        name="chatml", marker="<|im_start|>", end_of_turn=("<|im_end|>",),
        jinja=(
            "{%- for message in messages %}"
            "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
            "{%- endfor %}"
            "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
        ),
        go_template=(
            "{{- range .Messages }}<|im_start|>{{ .Role }}\n"
            "{{ .Content }}<|im_end|>\n"
            "{{ end }}<|im_start|>assistant\n"
        ),
    ),
    ChatFamily(
        name="llama3", marker="<|start_header_id|>", end_of_turn=("<|eot_id|>", "<|eom_id|>"),
        jinja=(
            "{{- bos_token or '' }}"
            "{%- for message in messages %}"
            "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
            "{%- endfor %}"
            "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
        ),
        go_template=(
            "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
            "{{ .Content }}<|eot_id|>\n"
            "{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
        ),
    ),
    # Gemma has no system role: the system prompt leads the first user turn, like Gemma 3's own
    # template, and the assistant's role is "model".
    ChatFamily(
        name="gemma", marker="<start_of_turn>", end_of_turn=("<end_of_turn>",),
        jinja=(
            "{{- bos_token or '' }}"
            "{%- if messages[0]['role'] == 'system' -%}"
            "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
            "{%- set loop_messages = messages[1:] -%}"
            "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
            "{%- for message in loop_messages -%}"
            "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
            "{{- '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
            "{{- message['content'] | trim }}{{- '<end_of_turn>\\n' }}"
            "{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' }}{%- endif -%}"
        ),
        go_template=(
            "{{- $system := \"\" }}\n"
            "{{- range .Messages }}{{ if eq .Role \"system\" }}{{ $system = .Content }}{{ end }}{{ end }}\n"
            "{{- $first := true }}\n"
            "{{- range .Messages }}\n"
            "{{- if eq .Role \"user\" }}<start_of_turn>user\n"
            "{{ if and $first $system }}{{ $system }}\n\n{{ end }}{{ .Content }}<end_of_turn>\n"
            "{{ $first = false }}\n"
            "{{- else if eq .Role \"assistant\" }}<start_of_turn>model\n"
            "{{ .Content }}<end_of_turn>\n"
            "{{ $first = false }}\n"
            "{{- end }}\n"
            "{{- end }}<start_of_turn>model\n"
        ),
    ),
    # Mistral Small 3 (tekken, "v7"): [SYSTEM_PROMPT] block first, [INST]...[/INST] with no spaces,
    # eos after an assistant turn. Before "mistral": its templates contain [INST] too.
    ChatFamily(
        name="mistral-v7", marker="[SYSTEM_PROMPT]",
        go_template=(
            "{{- range $i, $_ := .Messages }}\n"
            "{{- if eq .Role \"system\" }}{{ if eq $i 0 }}[SYSTEM_PROMPT]{{ .Content }}[/SYSTEM_PROMPT]{{ end }}\n"
            "{{- else if eq .Role \"user\" }}[INST]{{ .Content }}[/INST]\n"
            "{{- else if eq .Role \"assistant\" }}{{ .Content }}{EOS}\n"
            "{{- end }}\n"
            "{{- end }}"
        ),
    ),
    # Mistral [INST]: a system prompt goes in front of the first user message; an assistant turn
    # ends with the tokenizer's eos, so there is no end-of-turn token of its own.
    ChatFamily(
        name="mistral", marker="[INST]",
        jinja=(
            "{{- bos_token or '' }}"
            "{%- if messages[0]['role'] == 'system' -%}"
            "{%- set system = messages[0]['content'] + '\\n\\n' -%}{%- set loop_messages = messages[1:] -%}"
            "{%- else -%}{%- set system = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
            "{%- for message in loop_messages -%}"
            "{%- if message['role'] == 'assistant' -%}{{- message['content'] + (eos_token or '') }}"
            "{%- else -%}{{- '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}"
            "{%- endif -%}"
            "{%- endfor -%}"
        ),
        go_template=(
            "{{- $system := \"\" }}\n"
            "{{- range .Messages }}{{ if eq .Role \"system\" }}{{ $system = .Content }}{{ end }}{{ end }}\n"
            "{{- $first := true }}\n"
            "{{- range .Messages }}\n"
            "{{- if eq .Role \"user\" }}[INST] {{ if and $first $system }}{{ $system }}\n\n{{ end }}"
            "{{ .Content }} [/INST]{{ $first = false }}\n"
            "{{- else if eq .Role \"assistant\" }}{{ .Content }}{EOS}{{ $first = false }}\n"
            "{{- end }}\n"
            "{{- end }}"
        ),
    ),
    # qlocal's alpaca fallback: plain-text headers, assistant turns end with eos.
    ChatFamily(
        name="alpaca", marker="### Instruction:",
        jinja=(
            "{%- for message in messages %}"
            "{%- if message['role'] == 'system' %}{{- message['content'] + '\\n\\n' }}"
            "{%- elif message['role'] == 'assistant' %}{{- '### Response:\\n' + message['content'] + (eos_token or '') + '\\n\\n' }}"
            "{%- else %}{{- '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
            "{%- endif %}"
            "{%- endfor %}"
            "{%- if add_generation_prompt %}{{- '### Response:\\n' }}{%- endif %}"
        ),
        go_template=(
            "{{- range .Messages }}\n"
            "{{- if eq .Role \"system\" }}{{ .Content }}\n\n"
            "{{ else if eq .Role \"assistant\" }}### Response:\n{{ .Content }}{EOS}\n\n"
            "{{ else }}### Instruction:\n{{ .Content }}\n\n"
            "{{ end }}\n"
            "{{- end }}### Response:\n"
        ),
    ),
]

# Tool-calling (and thinking) formats of real models, after the generic families so detect() still
# names the generic one: export.ollama picks one of these only when the run's template renders like
# its `reference` on probe chats (tools, calls, results, reasoning), else falls back as before.
_TOOLS = {"marker": "<tool_call>", "end_of_turn": ("<|im_end|>",), "tool_call_tag": "<tool_call>"}
_TABLE += [
    ChatFamily(name="qwen2.5", **_TOOLS, go_template=_ollama("qwen2.5")[0], reference=_ollama("qwen2.5")[1]),
    ChatFamily(name="qwen3", **_TOOLS, thinking_tags=("<think>", "</think>"), go_template=_ollama("qwen3")[0],
               reference=_ollama("qwen3")[1]),
    ChatFamily(name="hermes", **_TOOLS, go_template=_ollama("hermes")[0], reference=_ollama("hermes")[1]),
    ChatFamily(name="llama3.1", marker="<|start_header_id|>", end_of_turn=("<|eot_id|>", "<|eom_id|>"),
               tool_call_tag="{", go_template=_ollama("llama3.1")[0], reference=_ollama("llama3.1")[1]),
    ChatFamily(name="mistral-v3", marker="[TOOL_CALLS]", tool_call_tag="[TOOL_CALLS][",
               go_template=_ollama("mistral-v3")[0], reference=_ollama("mistral-v3")[1]),
]

FAMILIES: dict[str, ChatFamily] = {f.name: f for f in _TABLE}
"""name -> family, in detection order (later entries are checked last)."""

# Formats known only by their end-of-turn token: Phi-3 `<|end|>`, Command-R `<|END_OF_TURN_TOKEN|>`.
# Their Modelfile TEMPLATE is derived from the model's own template (export.ollama).
OTHER_END_OF_TURN: tuple[str, ...] = ("<|end|>", "<|END_OF_TURN_TOKEN|>")

# EOS texts a template may write itself (Qwen/GPT-2, Llama 2/Mistral, Gemma): they end generation
# when the template contains them, but are not written as eot in a GGUF.
EOS_TEXTS: tuple[str, ...] = ("<|endoftext|>", "</s>", "<eos>")


def family(name: str | None) -> ChatFamily | None:
    """The family called `name`, or None."""
    return FAMILIES.get(name or "")


def detect(template: str) -> ChatFamily | None:
    """The first family whose marker the Jinja template contains, or None."""
    return next((f for f in FAMILIES.values() if f.marker in template), None)


def fallbacks() -> dict[str, str]:
    """name -> fallback Jinja template, for every family that has one, in table order."""
    return {f.name: f.jinja for f in FAMILIES.values() if f.jinja}


def end_of_turn_tokens() -> list[str]:
    """Every known end-of-turn token: the families' in table order, then OTHER_END_OF_TURN."""
    out: list[str] = []
    for tok in [t for f in FAMILIES.values() for t in f.end_of_turn] + list(OTHER_END_OF_TURN):
        if tok not in out:
            out.append(tok)
    return out
