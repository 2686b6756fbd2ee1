"""Chat templates: the model's own by default, named fallbacks, or a user's .jinja file.

The fallbacks follow the well-known originals so that a GGUF/Ollama export of the template behaves
like the model family it names. `bos_token` is emitted only when the tokenizer has one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qlocal.errors import UserError

CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

LLAMA3 = (
    "{{- bos_token or '' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

# Gemma has no system role: the system prompt is folded into the first user turn, like Gemma 3's.
GEMMA = (
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
)

# Mistral [INST] format; a system prompt goes in front of the first user message.
MISTRAL = (
    "{{- bos_token or '' }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] + '\\n\\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set system = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'assistant' -%}{{- message['content'] + (eos_token or '') }}"
    "{%- else -%}{{- '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

ALPACA = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{- message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'assistant' %}{{- '### Response:\\n' + message['content'] + (eos_token or '') + '\\n\\n' }}"
    "{%- else %}{{- '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '### Response:\\n' }}{%- endif %}"
)

FALLBACKS: dict[str, str] = {"chatml": CHATML, "llama3": LLAMA3, "gemma": GEMMA, "mistral": MISTRAL, "alpaca": ALPACA}
HINT = "pass --chat-template chatml|llama3|gemma|mistral|alpaca or a .jinja file"


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
            raise UserError(f"model {model} has no chat template; {HINT}")
        return own, "model"
    if choice.lower().endswith(".jinja"):
        path = Path(choice)
        if not path.is_file():
            raise UserError(f"{choice}: chat template file not found; {HINT}")
        return path.read_text(encoding="utf-8"), choice
    if choice in FALLBACKS:
        return FALLBACKS[choice], choice
    raise UserError(f"model.chat_template '{choice}' is not known; {HINT}")
