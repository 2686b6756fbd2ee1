"""Helpers for the rendering tests: read back which text an Example trains on."""

from __future__ import annotations

import itertools
from typing import Any

from qlocal.data.render import Example


def trained_spans(example: Example, tokenizer: Any) -> list[str]:
    """Decoded text of each run of consecutive target tokens (mask 1), special tokens shown."""
    runs = itertools.groupby(zip(example.input_ids, example.loss_mask), key=lambda pair: pair[1])
    return [tokenizer.decode([tok for tok, _ in run], skip_special_tokens=False) for on, run in runs if on]
