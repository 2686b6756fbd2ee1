"""Detect a training record's format by its keys and normalise it to a `Sample`.

Formats (chosen by the keys present, like mlx-lm's tuner/datasets.py):
  alpaca      instruction + output (optional input, system, history=[[q, a], ...])
  sharegpt    conversations: [{from, value}]  (human/user, gpt/assistant/model, system, tool, ...)
  messages    messages: [{role, content}]     (OpenAI; content a string or [{type: text, text}])
                                              tools, tool calls, tool results and reasoning: data/tools.py
  completion  prompt + completion             (rendered through the chat template as user/assistant)
  text        text                            (raw text, every token trained)

Records come from qlocal.data.readers with a location string ("file:LINE", "file:[i]", "file:row N")
that each error names. No torch/mlx imports here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from qlocal.data import tools as tooldata
from qlocal.data.loader import SKIP_HINT, read_all
from qlocal.data.readers import load_records
from qlocal.errors import UserError

FORMATS = ("alpaca", "sharegpt", "messages", "completion", "text")

# ShareGPT / LLaMA-Factory role tags -> chat roles. function_call is the model calling a tool, so it
# is an assistant turn (trained); observation is the tool's answer.
ROLES = {
    "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
    "bot": "assistant", "chatgpt": "assistant", "function_call": "assistant", "system": "system",
    "tool": "tool", "observation": "tool", "function": "tool", "ipython": "tool",
}


@dataclass
class Sample:
    """One normalised record: a chat (list of {role, content}, plus the tool/reasoning keys of
    qlocal.data.tools) or a plain text."""

    kind: str  # "chat" or "text"
    messages: list[dict[str, Any]] = field(default_factory=list)
    text: str = ""
    where: str = ""  # "file:LINE" of the record, for error messages further down the line
    tools: list[dict] | None = None  # function schemas the template renders (OpenAI shape)


def detect_format(record: dict) -> str | None:
    """Name the format of one record from its keys, or None when no format fits."""
    if "messages" in record:
        turns = record["messages"]
        # LLaMA-Factory allows sharegpt-style {from, value} turns under a `messages` key.
        if isinstance(turns, list) and turns and isinstance(turns[0], dict) and "from" in turns[0]:
            return "sharegpt"
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "prompt" in record and "completion" in record:
        return "completion"
    if "text" in record:
        return "text"
    return None


def _str(record: dict, key: str, fmt: str, where: str, optional: bool = False) -> str:
    value = record.get(key)
    if value is None and optional:
        return ""
    if key not in record:
        raise UserError(f"{where}: missing '{key}' ({fmt} record); {SKIP_HINT}")
    if not isinstance(value, str):
        raise UserError(f"{where}: '{key}' must be a string ({fmt} record), got {type(value).__name__}; {SKIP_HINT}")
    return value


def _content(value: Any, where: str, key: str) -> str:
    """A turn's content: a string, or OpenAI-style parts [{type: text, text}] joined."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        texts = [p.get("text") for p in value if p.get("type", "text") == "text"]
        if all(isinstance(t, str) for t in texts) and texts:
            return "".join(texts)
    raise UserError(f"{where}: '{key}' must be a string or a list of {{type: text, text}} parts; {SKIP_HINT}")


def _turns(record: dict, key: str, fmt: str, where: str) -> list[dict[str, Any]]:
    turns = record.get(key)
    if not isinstance(turns, list) or not turns:
        raise UserError(f"{where}: '{key}' must be a non-empty list of turns ({fmt} record); {SKIP_HINT}")
    role_key, content_key = ("from", "value") if fmt == "sharegpt" else ("role", "content")
    messages = []
    for i, turn in enumerate(turns):
        loc = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise UserError(f"{where}: '{loc}' must be an object with '{role_key}' and '{content_key}'; {SKIP_HINT}")
        # Accept either spelling of the keys; files mixing the two conventions are common.
        role = turn.get(role_key, turn.get("role", turn.get("from")))
        content = turn.get(content_key, turn.get("content", turn.get("value")))
        if not isinstance(role, str) or role.lower() not in ROLES:
            raise UserError(f"{where}: '{loc}.{role_key}' is {role!r}; use one of "
                            f"{', '.join(sorted(set(ROLES)))}; {SKIP_HINT}")
        chat_role = ROLES[role.lower()]
        if chat_role == "tool":  # a result may be text, text parts or any JSON value
            if isinstance(content, list) and content and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                content = _content(content, where, f"{loc}.{content_key}")
            messages.append(tooldata.tool_turn(turn, content, where, loc))
            continue
        if content is None and chat_role != "assistant":  # an assistant may only call tools
            raise UserError(f"{where}: '{loc}' has no '{content_key}'; {SKIP_HINT}")
        is_call = role.lower() == "function_call"  # its value is the call itself, parsed in data.tools
        text = content if content is None or is_call else _content(content, where, f"{loc}.{content_key}")
        if chat_role == "assistant":
            messages.append(tooldata.assistant_turn(turn, text, role.lower(), where, loc))
        else:
            messages.append({"role": chat_role, "content": text})
    return tooldata.link_results(messages)


def parse_turns(record: dict, key: str, where: str) -> list[dict[str, Any]]:
    """record[key] as chat messages, read as the messages format reads them (either key spelling,
    tool calls, tool results, reasoning); for other record shapes (qlocal.data.pref_formats)."""
    return _turns(record, key, "messages", where)


def normalise(record: dict, fmt: str, where: str) -> Sample:
    """Turn one record of format `fmt` into a Sample; a missing or mistyped field is a UserError."""
    if fmt == "text":
        return Sample("text", text=_str(record, "text", fmt, where), where=where)
    if fmt in ("messages", "sharegpt"):
        messages = _turns(record, "messages" if "messages" in record else "conversations", fmt, where)
        system = record.get("system")  # LLaMA-Factory sharegpt keeps the system prompt beside the turns
        if isinstance(system, str) and system and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system})
        tools = tooldata.parse_tools(record.get("tools"), where)
        if not any(m["role"] == "assistant" for m in messages):
            raise UserError(f"{where}: the conversation has no assistant turn, so there is nothing to train on; {SKIP_HINT}")
        return Sample("chat", messages=messages, where=where, tools=tools)
    elif fmt == "alpaca":
        instruction = _str(record, "instruction", fmt, where)
        extra = _str(record, "input", fmt, where, optional=True)
        output = _str(record, "output", fmt, where)
        system = _str(record, "system", fmt, where, optional=True)
        messages = [{"role": "system", "content": system}] if system else []
        history = record.get("history") or []
        if not isinstance(history, list) or not all(
                isinstance(h, (list, tuple)) and len(h) == 2 and all(isinstance(x, str) for x in h) for h in history):
            raise UserError(f"{where}: 'history' must be a list of [question, answer] string pairs (alpaca record); {SKIP_HINT}")
        for q, a in history:
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    elif fmt == "completion":
        messages = [{"role": "user", "content": _str(record, "prompt", fmt, where)},
                    {"role": "assistant", "content": _str(record, "completion", fmt, where)}]
    else:
        raise UserError(f"data.format '{fmt}' is not known; use auto, {', '.join(FORMATS)}")
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{where}: the conversation has no assistant turn, so there is nothing to train on; {SKIP_HINT}")
    return Sample("chat", messages=messages, where=where)


def empty_answers(samples: list[Sample]) -> list[str]:
    """Where each chat with a blank assistant turn is (no text, no tool call, no reasoning): such a
    turn is still trained (its end-of-turn tokens), so it teaches the model to answer nothing."""
    def blank(m: dict[str, Any]) -> bool:
        return (m["role"] == "assistant" and not str(m.get("content") or "").strip()
                and not m.get("tool_calls") and not m.get("reasoning_content"))

    return [s.where for s in samples if s.kind == "chat" and any(blank(m) for m in s.messages)]


def empty_answer_warning(path: str, wheres: list[str]) -> str:
    """The one line `qlocal train` and `qlocal data check` print for empty_answers' records."""
    shown = ", ".join(wheres[:3]) + (", ..." if len(wheres) > 3 else "")
    which = f"1 record in {path} has" if len(wheres) == 1 else f"{len(wheres)} records in {path} have"
    return (f"warning: {which} an empty assistant answer ({shown}); training teaches the model to answer "
            "those with nothing: write the answer (alpaca 'output', the assistant turn's content) or remove the record")


def load_samples(path: str, fmt: str = "auto", split: str = "train", skip_bad_lines: bool = False,
                 mapping: Any = None, tools: str | None = None,
                 for_eval: bool = False) -> tuple[list[Sample], dict[str, Any]]:
    """Load, detect and normalise every record of `path`.

    With fmt="auto" all records must share one format. `mapping` (a qlocal.data.mapping.Mapping)
    maps other dataset shapes first; records it turns into chats count as format "mapped".
    `tools` (data.tools) names a JSON file of function schemas for chats that carry none of their own.
    `for_eval` words the preference-pair error for `qlocal eval` (which scores one answer per record).
    Returns (samples, stats) where stats is
    {"format": name, "counts": {name: n}, "skipped": n, "skipped_where": [first few locations]}.
    """
    if fmt != "auto" and fmt not in FORMATS:
        raise UserError(f"data.format '{fmt}' is not known; use auto, {', '.join(FORMATS)}")
    skipped: list[str] = []
    shared_tools = tooldata.load_tools_file(tools) if tools else None
    records = load_records(path, split, skipped if skip_bad_lines else None)
    return read_all(path, records, skipped, fmt, "--format", _SFTKind(fmt, mapping, shared_tools, for_eval),
                    skip_bad_lines)


class _SFTKind:
    """load_samples' steps in the shared record loop (qlocal.data.loader)."""

    unit = "format"

    def __init__(self, fmt: str, mapping: Any, shared_tools: list[dict] | None, for_eval: bool) -> None:
        self.fmt, self.mapping, self.shared_tools, self.for_eval = fmt, mapping, shared_tools, for_eval

    def shape(self, original: dict, where: str) -> tuple[str, Any]:
        """(format, record); a record the mapping already turned into a chat is format "mapped"."""
        rec = self.mapping.apply(original, where) if self.mapping is not None else original
        if isinstance(rec, Sample):
            return "mapped", rec
        this = self.fmt if self.fmt != "auto" else detect_format(rec)
        if this is None and ("chosen" in rec or "rejected" in rec):
            if self.for_eval:  # "train it with --method dpo" would mislead after a DPO run
                raise UserError(f"{where}: a preference pair (chosen/rejected) among one-answer records; qlocal eval "
                                "scores a file of pairs (from its first record) or of {prompt, completion} records: "
                                "keep one kind per file")
            raise UserError(f"{where}: a preference pair (chosen/rejected); SFT reads one answer per record: "
                            "train it with --method dpo (or orpo, simpo, kto)")
        if self.fmt == "auto" and this == "completion" and isinstance(rec.get("label"), bool):
            raise UserError(f"{where}: prompt + completion + a true/false label is KTO data; SFT would train on "
                            "the undesirable answers too: train it with --method kto")
        if this is None:
            keys = ", ".join(sorted(map(str, rec))[:8]) or "none"
            raise UserError(f"{where}: cannot tell the format from the keys ({keys}); expected instruction+output "
                            "(alpaca), conversations (sharegpt), messages, prompt+completion or text, or map the fields "
                            "in a --config file (data.columns / data.prompt_template; see configs/mapping_*.yaml)")
        return this, rec

    def compatible(self, this: str, first: str) -> bool:
        return this == "mapped" or this == first  # mapped chats may follow any first record

    def normalise(self, record: Any, this: str, where: str, original: dict) -> Any:
        if this == "mapped":
            return record
        sample = normalise(record, this, where)
        if self.shared_tools and sample.kind == "chat" and not sample.tools:
            sample.tools = self.shared_tools
        return self.mapping.add_system(sample, original, where) if self.mapping is not None else sample
