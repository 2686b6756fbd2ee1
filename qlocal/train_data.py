"""A run's training and validation data: load, normalise, split and render into Examples."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from qlocal import distributed, preference_run
from qlocal.config import Config
from qlocal.errors import UserError


@dataclass
class PreparedData:
    """Rendered train/validation examples and what rendering them found (format, template, truncation)."""

    train: list[Any]
    val: list[Any]
    format: str
    truncated: int
    template_name: str
    template: str
    dropped: int = 0


@dataclass
class LoadedData:
    """A run's records read, normalised and split, before any tokenizer: every bad line is found here."""

    train: list[Any]
    val: list[Any]
    format: str


def load_data(cfg: Config) -> LoadedData:
    """Read, normalise and split the training (and validation) records; cheap, so train runs it
    before any model is resolved, converted or downloaded (a wrong path fails in well under a second)."""
    if preference_run.is_preference(cfg):  # pairs or labelled answers: qlocal.data.preference
        return LoadedData(*preference_run.load(cfg))
    from qlocal.data.formats import load_samples
    from qlocal.data.mapping import mapping_from_config
    from qlocal.data.split import split_validation

    dc = cfg.data
    mapping = mapping_from_config(dc)  # None unless the config maps another dataset shape
    samples, stats = load_samples(dc.path, dc.format, dc.split, skip_bad_lines=dc.skip_bad_lines, mapping=mapping,
                                  tools=dc.tools)
    if stats.get("skipped") and distributed.from_env().is_main:
        print(f"warning: skipped {stats['skipped']} bad records in {dc.path} "
              f"(first: {', '.join(stats.get('skipped_where', []))})", file=sys.stderr)
    _warn_empty_answers(dc.path, samples)
    val_samples: list[Any] = []
    if dc.val_path:
        val_samples, _ = load_samples(dc.val_path, dc.format, dc.split, skip_bad_lines=dc.skip_bad_lines,
                                      mapping=mapping, tools=dc.tools)
        _warn_empty_answers(dc.val_path, val_samples)
    else:  # the rule export and eval use to find the held-out records again (qlocal.data.split)
        samples, val_samples = split_validation(samples, dc.val_split, cfg.train.seed)
    return LoadedData(samples, val_samples, str(stats.get("format", "?")))


def _warn_empty_answers(path: str, samples: list[Any]) -> None:
    """Trained as written (as LLaMA-Factory and mlx-lm do), but said: an empty answer is a data bug."""
    from qlocal.data.formats import empty_answer_warning, empty_answers

    wheres = empty_answers(samples)
    if wheres and distributed.from_env().is_main:
        print(empty_answer_warning(path, wheres), file=sys.stderr)


def prepare_data(cfg: Config, tokenizer: Any, template_choice: str | None,
                 loaded: LoadedData | None = None) -> PreparedData:
    """Render the loaded records (`loaded`, else load_data(cfg)) into Examples."""
    from qlocal.data.render import render
    from qlocal.data.templates import resolve_chat_template

    template, template_name = resolve_chat_template(tokenizer, template_choice)
    loaded = loaded or load_data(cfg)
    if preference_run.is_preference(cfg):
        train, val, truncated, dropped = preference_run.prepare(cfg, tokenizer, template, loaded.train, loaded.val)
        return PreparedData(train, val, loaded.format, truncated, template_name, template, dropped)
    dc = cfg.data
    samples, val_samples = loaded.train, loaded.val

    def render_all(items: list[Any]) -> list[Any]:
        return [render(s, tokenizer, template, train_on_prompt=dc.train_on_prompt, max_seq_len=dc.max_seq_len,
                       train_on_reasoning=dc.train_on_reasoning) for s in items]

    train, val = render_all(samples), render_all(val_samples)
    dropped = 0
    if dc.drop_long:
        dropped = sum(e.truncated for e in train) + sum(e.truncated for e in val)
        train, val = [e for e in train if not e.truncated], [e for e in val if not e.truncated]
    train = [e for e in train if sum(e.loss_mask[1:]) > 0]
    if not train:
        raise UserError(f"{dc.path}: no example has a trained token left after truncating or dropping at "
                        f"data.max_seq_len={dc.max_seq_len}; raise it")
    truncated = sum(e.truncated for e in train) + sum(e.truncated for e in val)
    if (truncated or dropped) and distributed.from_env().is_main:
        what = f"dropped {dropped}" if dropped else f"truncated {truncated}"
        fix = "" if dropped else " (or --drop-long to leave them out)"
        print(f"warning: {what} examples longer than data.max_seq_len={dc.max_seq_len}; "
              f"raise --max-seq-len to keep them whole{fix}", file=sys.stderr)
    return PreparedData(train, val, loaded.format, truncated, template_name, template, dropped)
