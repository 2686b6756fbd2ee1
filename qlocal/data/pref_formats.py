"""Preference records: detect their shape by keys and normalise them to PairSample / KTOSample.

Shapes (chosen by the keys present, as data.formats does for SFT):
  pairs           prompt + chosen + rejected: strings (a user turn and two assistant answers) or
                  TRL's conversational form (prompt: messages, chosen/rejected: assistant
                  messages); either side may be a string and the other messages
  pairs_implicit  chosen + rejected without prompt: two whole conversations (UltraFeedback,
                  Anthropic HH as messages) split where they first differ; the shared turns are the
                  prompt. A `prompt` string beside them must be their last shared user turn.
  kto             prompt + completion + label (true = desirable, false = undesirable)
Optional keys: `system` (a system turn before the prompt unless it has one), `tools` (function
schemas, as data.tools reads them). Messages take every spelling data.formats accepts ({role,
content} or {from, value}, tool calls, tool results, reasoning).

`data.columns` maps other field names onto these keys ({prompt: question, chosen: good,
rejected: bad, completion, label, system, tools}). For method kto a pairs file is unpaired: its
chosen answer desirable, its rejected answer undesirable (TRL's unpair_preference_dataset).

Every error names the record's file:line, the key and the fix, as SFT data errors do.
Framework-free.
"""

from __future__ import annotations

from typing import Any

from qlocal.data.formats import parse_turns
from qlocal.data.loader import SKIP_HINT, read_all
from qlocal.data.readers import load_records
from qlocal.data.preference import KTOSample, PairSample
from qlocal.data.tools import load_tools_file, parse_tools
from qlocal.errors import UserError

PREF_FORMATS = ("pairs", "pairs_implicit", "kto")
PREF_COLUMNS = ("prompt", "chosen", "rejected", "completion", "label", "system", "tools")
PAIR_METHODS = ("dpo", "orpo", "simpo")


def detect_preference(record: dict) -> str | None:
    """Name the preference shape of one record from its keys, or None when none fits."""
    if "chosen" in record or "rejected" in record:
        return "pairs" if "prompt" in record and not _whole_conversation(record) else "pairs_implicit"
    if "completion" in record and "label" in record:
        return "kto"
    return None


def file_shape(path: str, split: str, data_cfg: Any = None) -> str | None:
    """The preference shape of `path`'s first record (after data.columns, when data_cfg maps any),
    or None when it is not preference data: how `qlocal eval` tells pairs from SFT records. A KTO
    record needs a true/false label (an SFT classification set has label strings)."""
    columns = dict(getattr(data_cfg, "columns", None) or {})
    records = load_records(path, split, [])
    if not records:
        return None
    record, where = records[0]
    try:
        record = _rename(record, {k: v for k, v in columns.items() if k in PREF_COLUMNS}, where)
    except UserError:  # a column the mapping names is missing: not this run's preference data
        return None
    shape = detect_preference(record)
    if shape == "kto" and not (isinstance(record.get("label"), bool)
                               or str(record.get("label")).strip().lower() in ("true", "false")):
        return None
    return shape


def _whole_conversation(record: dict) -> bool:
    # UltraFeedback keeps a prompt string and chosen/rejected conversations that repeat it.
    chosen = record.get("chosen")
    return isinstance(chosen, list) and any(isinstance(t, dict) and (t.get("role") or t.get("from")) in
                                            ("user", "human", "system") for t in chosen)


def _messages(record: dict, key: str, where: str, role: str) -> list[dict[str, Any]]:
    """record[key] as messages: a string is one `role` turn; a list is read as a chat."""
    value = record.get(key)
    if value is None:
        raise UserError(f"{where}: missing '{key}' (preference record); {SKIP_HINT}")
    if isinstance(value, str):
        if not value.strip():
            raise UserError(f"{where}: '{key}' is empty; {SKIP_HINT}")
        return [{"role": role, "content": value}]
    if isinstance(value, dict):  # one message given bare
        value = [value]
    if not isinstance(value, list):
        raise UserError(f"{where}: '{key}' must be a string or a list of messages, got {type(value).__name__}; {SKIP_HINT}")
    return parse_turns({key: value}, key, where)


def _answer(record: dict, key: str, where: str) -> list[dict[str, Any]]:
    msgs = _messages(record, key, where, "assistant")
    if msgs[0]["role"] != "assistant":
        raise UserError(f"{where}: '{key}' must start with an assistant turn (the answer), got a "
                        f"{msgs[0]['role']} turn; put the conversation before it in 'prompt'; {SKIP_HINT}")
    return msgs


def _prompt(record: dict, where: str) -> list[dict[str, Any]]:
    msgs = _messages(record, "prompt", where, "user")
    if msgs[-1]["role"] == "assistant":
        raise UserError(f"{where}: 'prompt' ends with an assistant turn; the answer belongs in "
                        f"chosen/rejected/completion; {SKIP_HINT}")
    return msgs


def _with_system(record: dict, prompt: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    system = record.get("system")
    if system is None or system == "":
        return prompt
    if not isinstance(system, str):
        raise UserError(f"{where}: 'system' must be a string, got {type(system).__name__}; {SKIP_HINT}")
    return prompt if prompt[0]["role"] == "system" else [{"role": "system", "content": system}] + prompt


def _split_conversations(record: dict, where: str) -> tuple[list[dict], list[dict], list[dict]]:
    """(shared prompt, chosen answer, rejected answer) of two whole conversations."""
    chosen = _messages(record, "chosen", where, "assistant")
    rejected = _messages(record, "rejected", where, "assistant")
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == len(chosen) and n == len(rejected):
        raise UserError(f"{where}: 'chosen' and 'rejected' are identical, so there is no preference to learn; {SKIP_HINT}")
    if n == 0:
        raise UserError(f"{where}: 'chosen' and 'rejected' share no prompt turns and there is no 'prompt'; "
                        f"give a 'prompt' or make both whole conversations that start with the same turns; {SKIP_HINT}")
    if n == len(chosen) or n == len(rejected):
        short = "chosen" if n == len(chosen) else "rejected"
        raise UserError(f"{where}: '{short}' is only the shared prompt, with no answer of its own; {SKIP_HINT}")
    for key, conv in (("chosen", chosen), ("rejected", rejected)):
        if conv[n]["role"] != "assistant":
            raise UserError(f"{where}: '{key}' and the other side differ at turn {n + 1}, a {conv[n]['role']} turn; "
                            f"they must share everything before the answer; {SKIP_HINT}")
    prompt = chosen[:n]
    given = record.get("prompt")
    if isinstance(given, str) and given.strip():
        users = [m["content"] for m in prompt if m["role"] == "user"]
        if not users or users[-1].strip() != given.strip():
            raise UserError(f"{where}: 'prompt' is not the conversations' last shared user turn; drop it or fix it; {SKIP_HINT}")
    return prompt, chosen[n:], rejected[n:]


def normalise_preference(record: dict, fmt: str, where: str) -> PairSample | KTOSample:
    """One record of shape `fmt` as a PairSample or KTOSample; a bad field is a UserError."""
    tools = parse_tools(record.get("tools"), where)
    if fmt == "kto":
        if "completion" not in record:
            raise UserError(f"{where}: missing 'completion' (KTO record: prompt, completion, label); {SKIP_HINT}")
        label = _label(record.get("label"), where)
        return KTOSample(_with_system(record, _prompt(record, where), where), _answer(record, "completion", where),
                         label, where, tools)
    if fmt not in ("pairs", "pairs_implicit"):
        raise UserError(f"preference data format '{fmt}' is not known; use auto, {', '.join(PREF_FORMATS)}")
    for key in ("chosen", "rejected"):
        if record.get(key) is None:
            raise UserError(f"{where}: missing '{key}' (a preference pair needs both chosen and rejected); {SKIP_HINT}")
    if fmt == "pairs_implicit":
        prompt, chosen, rejected = _split_conversations(record, where)
    else:
        prompt, chosen, rejected = _prompt(record, where), _answer(record, "chosen", where), _answer(record, "rejected", where)
        if chosen == rejected:
            raise UserError(f"{where}: 'chosen' and 'rejected' are identical, so there is no preference to learn; {SKIP_HINT}")
    return PairSample(_with_system(record, prompt, where), chosen, rejected, where, tools)


def _label(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):  # CSV cells are text
        return value.strip().lower() == "true"
    raise UserError(f"{where}: 'label' must be true (desirable) or false (undesirable), got {value!r}; {SKIP_HINT}")


def unpair(pairs: list[PairSample]) -> list[KTOSample]:
    """Each pair as two KTO samples: chosen desirable, rejected undesirable."""
    out: list[KTOSample] = []
    for p in pairs:
        out += [KTOSample(p.prompt, p.chosen, True, p.where, p.tools), KTOSample(p.prompt, p.rejected, False, p.where, p.tools)]
    return out


def _columns(data_cfg: Any) -> dict[str, str]:
    """data.columns for preference data; SFT-only mapping keys are an error naming the fix."""
    columns = dict(getattr(data_cfg, "columns", None) or {})
    wrong = [k for k in columns if k not in PREF_COLUMNS]
    if wrong:
        raise UserError(f"data.columns.{wrong[0]}: preference data maps {', '.join(PREF_COLUMNS)} "
                        "(e.g. columns: {prompt: question, chosen: good, rejected: bad})")
    for key in ("prompt_template", "response_template", "system_prompt"):
        if getattr(data_cfg, key, None) is not None:
            raise UserError(f"data.{key} builds SFT turns; preference data maps its fields with data.columns")
    if getattr(data_cfg, "label_map", None):
        raise UserError("data.label_map is for SFT classification sets; a KTO label is true/false (data.columns.label)")
    return columns


def _rename(record: dict, columns: dict[str, str], where: str) -> dict:
    if not columns:
        return record
    out = {k: v for k, v in record.items() if k not in PREF_COLUMNS}
    for key in PREF_COLUMNS:
        col = columns.get(key, key)
        if col in record:
            out[key] = record[col]
        elif key in columns:
            keys = ", ".join(sorted(map(str, record))[:12])
            raise UserError(f"{where}: column '{col}' (data.columns.{key}) is missing (record has: {keys}); {SKIP_HINT}")
    return out


def load_preference(path: str, method: str | None, data_cfg: Any) -> tuple[list[PairSample] | list[KTOSample], dict[str, Any]]:
    """Load, detect and normalise every preference record of `path` for `method` (dpo/orpo/simpo:
    pairs; kto: labelled answers, or pairs unpaired; None: whichever the file holds). data_cfg is the run's DataConfig (format,
    split, skip_bad_lines, columns, tools). Returns (samples, stats) with stats
    {"format", "counts", "skipped", "skipped_where", "unpaired"}.
    """
    fmt = getattr(data_cfg, "format", "auto")
    wants = f"train.method={method}" if method else "preference data"
    if fmt not in ("auto",) + PREF_FORMATS:
        raise UserError(f"data.format '{fmt}' is SFT data; {wants} reads prompt/chosen/rejected records: "
                        f"leave data.format at auto or use {', '.join(PREF_FORMATS)}")
    skip = bool(getattr(data_cfg, "skip_bad_lines", False))
    columns = _columns(data_cfg)
    tools_file = getattr(data_cfg, "tools", None)
    shared_tools = load_tools_file(tools_file) if tools_file else None
    skipped: list[str] = []
    records = load_records(path, getattr(data_cfg, "split", "train"), skipped if skip else None)
    samples, stats = read_all(path, records, skipped, fmt, "data.format", _PrefKind(fmt, columns, shared_tools, wants), skip)
    kto_data = isinstance(samples[0], KTOSample)
    if method in PAIR_METHODS and kto_data:
        raise UserError(f"{path}: holds KTO records (prompt, completion, label) but train.method={method} "
                        "needs pairs (prompt, chosen, rejected); use --method kto")
    unpaired = method == "kto" and not kto_data
    if unpaired:
        samples = unpair(samples)
    return samples, {**stats, "unpaired": unpaired}


class _PrefKind:
    """load_preference's steps in the shared record loop (qlocal.data.loader)."""

    unit = "kind"

    def __init__(self, fmt: str, columns: dict[str, str], shared_tools: list[dict] | None, wants: str) -> None:
        self.fmt, self.columns, self.shared_tools, self.wants = fmt, columns, shared_tools, wants

    def shape(self, original: dict, where: str) -> tuple[str, dict]:
        rec = _rename(original, self.columns, where)
        this = self.fmt if self.fmt != "auto" else detect_preference(rec)
        if this is None:
            keys = ", ".join(sorted(map(str, rec))[:8]) or "none"
            raise UserError(f"{where}: not preference data (keys: {keys}); {self.wants} needs "
                            "prompt + chosen + rejected (or chosen/rejected conversations), or prompt + completion "
                            "+ label for kto; map other names with data.columns")
        return this, rec

    def compatible(self, this: str, first: str) -> bool:
        return (this == "kto") == (first == "kto")  # pairs with or without a prompt may mix

    def normalise(self, record: dict, this: str, where: str, original: dict) -> PairSample | KTOSample:
        sample = normalise_preference(record, this, where)
        if self.shared_tools and not sample.tools:
            sample.tools = self.shared_tools
        return sample
