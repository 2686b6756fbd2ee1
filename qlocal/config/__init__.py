"""Typed run configuration: defaults < YAML file < CLI flags < --set key=value.

One dataclass per concern (`sections`); the field docstrings are the reference for every key.
Unknown keys and values of the wrong type are errors naming the key (`layers`, `coerce`); choices,
ranges and keys that only go together are checked in `checks`. Callers import from here.
"""

from __future__ import annotations

from qlocal.config.checks import CHOICES, REPORT_TO
from qlocal.config.layers import apply, build, from_dict, load_yaml, parse_set, save
from qlocal.config.sections import (
    Config,
    DataConfig,
    LoraConfig,
    ModelConfig,
    PreferenceConfig,
    RunConfig,
    TrainConfig,
)

__all__ = [
    "CHOICES", "REPORT_TO", "Config", "DataConfig", "LoraConfig", "ModelConfig", "PreferenceConfig",
    "RunConfig", "TrainConfig", "apply", "build", "from_dict", "load_yaml", "parse_set", "save",
]
