"""A tiny model that really calls a tool: a lively random Qwen2-shaped model fine-tuned (LoRA, torch,
48 steps) on chats where the user asks about the weather in Paris and the assistant calls
get_weather {"city": "Paris"}, or, after the tool's result, answers "It is sunny." Greedy decoding on
those prompts then writes the call text the template renders (`<tool_call>{...}</tool_call>`), so
serving, chat and generate are tested on outputs a model produced, parsed with the template's tag.

The template is a compact ChatML one with tools in the Hermes/Qwen style (the real templates'
long tool preambles would make every training step several times slower on CPU); its call tag
comes from the chat-family table like any other `<tool_call>` template's. Built once per process.
"""

from __future__ import annotations

import json
from pathlib import Path

TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nTools: {% for t in tools %}{{ t.function.name }}"
    "{{ ' ' if not loop.last }}{% endfor %}<|im_end|>\n{% endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' %}<|im_start|>assistant\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<tool_call>{\"name\": \"{{ c.function.name }}\", "
    "\"arguments\": {{ c.function.arguments | tojson }}}</tool_call>{% endfor %}<|im_end|>\n"
    "{% elif m.role == 'tool' %}<|im_start|>user\n<tool_response>{{ m.content }}</tool_response><|im_end|>\n"
    "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
QUESTIONS = ["Weather in Paris?", "What's the weather in Paris?", "Is it raining in Paris?", "Paris weather now?",
             "How warm is Paris today?", "Tell me the weather in Paris.", "Paris: sunny or not?", "Weather for Paris please"]
CALL = {"name": "get_weather", "arguments": {"city": "Paris"}}
RESULT = '{"sky": "sunny"}'
ANSWER = "It is sunny."

_CACHE: dict[str, Path] = {}


def _chats() -> list[dict]:
    call = {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": CALL}]}
    rows = []
    for q in QUESTIONS:
        rows.append({"messages": [{"role": "user", "content": q}, call], "tools": [WEATHER]})
        rows.append({"messages": [{"role": "user", "content": q}, call, {"role": "tool", "content": RESULT},
                                  {"role": "assistant", "content": ANSWER}], "tools": [WEATHER]})
    return rows


def tool_run(root: Path) -> Path:
    """outputs/<run> of the tool-calling fine-tune."""
    if "run" not in _CACHE:
        from infer_helpers import lively_model

        from qlocal import config as config_mod
        from qlocal.train import train

        root.mkdir(parents=True, exist_ok=True)
        data, template = root / "weather_calls.jsonl", root / "tiny_tools.jinja"
        data.write_text("".join(json.dumps(r) + "\n" for r in _chats()), encoding="utf-8")
        template.write_text(TEMPLATE, encoding="utf-8")
        sets = {"model.name": lively_model(root, "qwen2"), "data.path": data, "run.output_dir": root / "runs",
                "run.name": "weather", "train.backend": "torch", "train.iters": 48, "train.batch_size": 4,
                "train.lr": 2e-2, "train.lr_schedule": "constant", "model.chat_template": template,
                "train.save_every": 1000, "data.max_seq_len": 512}
        _CACHE["run"] = train(config_mod.build(sets=[f"{k}={v}" for k, v in sets.items()]), quiet=True)
    return _CACHE["run"]


def tool_export(root: Path) -> Path:
    """export/<run> (fused/, model-f16.gguf) of the tool-calling fine-tune."""
    if "export" not in _CACHE:
        from infer_helpers import export_folder

        _CACHE["export"] = export_folder(root, tool_run(root))
    return _CACHE["export"]


def tools_file(root: Path) -> Path:
    """A --tools file with the get_weather schema."""
    path = root / "tools.json"
    path.write_text(json.dumps([WEATHER]), encoding="utf-8")
    return path
