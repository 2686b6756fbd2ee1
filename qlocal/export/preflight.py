"""Will this base model export to GGUF? Decided before training loads any weights.

The verdict reads config.json and the tokenizer files only: the architecture must be in the GGUF
family table (gguf_arch) and llama.cpp must tokenise the probe corpus as HF does (pretokenizer's
check on the tokenizer alone, about 0.1 s). It never raises: a folder it cannot read, a tokenizer
the `tokenizers` library refuses or a missing `gguf` extra is a reason, because the verdict is
advice (a warning) unless the user asked for it to be a requirement (`model.require_export`).
No torch, transformers or backend is imported here.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlocal.errors import UserError

GGUF_EXTRA = "export needs pip install 'qlocal[gguf]'"


@dataclass
class Verdict:
    """Whether a model folder exports to GGUF, and if not, every reason why."""

    ok: bool
    reasons: list[str] = field(default_factory=list)
    family: str | None = None
    """The GGUF family table entry that covers the architecture (None when none does)."""
    pretokenizer: str | None = None
    """llama.cpp pre-tokenizer that reproduces the HF tokenizer (None when none does)."""
    seconds: float = 0.0

    def line(self, model: str) -> str:
        """One line: what exports, or what will not and why."""
        if self.ok:
            return (f"export: {model} exports to GGUF (family {self.family}, llama.cpp pre-tokenizer "
                    f"{self.pretokenizer!r} tokenises like HF; checked in {self.seconds:.2f}s)")
        return f"export: {model} will not export to GGUF: {'; '.join(self.reasons)}"


def export_verdict(model_path: Path) -> Verdict:
    """The export verdict of an HF model folder from its config.json and tokenizer files; never raises."""
    t0 = time.perf_counter()
    path = Path(model_path)
    reasons: list[str] = []
    family = pre = None
    try:
        from qlocal.export import gguf_arch, pretokenizer
    except ImportError as e:  # gguf (or what it needs) is missing: nothing can be checked
        return Verdict(False, [f"{GGUF_EXTRA} ({e.name or 'gguf'} is not installed)"],
                       seconds=time.perf_counter() - t0)
    config = _read_config(path, reasons)
    if config is not None:
        try:
            fam = gguf_arch.find_family(config)
            family = fam.name
            _check_header(fam, gguf_arch.text_hparams(config), reasons)
        except UserError:
            archs = config.get("architectures") if isinstance(config.get("architectures"), list) else []
            got = "/".join(map(str, archs)) or str(config.get("model_type") or "unknown")
            reasons.append(f"architecture {got} is not supported (supported: {gguf_arch.supported_families()})")
    check = _tokenizer_check(path, pretokenizer.check_pretokenizer, reasons)
    if check is not None:
        if check.matched:
            pre = check.pre
        else:
            reasons.append(f"{check.line()} (export would need --allow-tokenizer-mismatch)")
    return Verdict(not reasons, reasons, family, pre, round(time.perf_counter() - t0, 3))


def _check_header(fam: Any, hp: dict[str, Any], reasons: list[str]) -> None:
    """The family's GGUF header written into memory: what llama.cpp cannot run (SmolLM3's NoPE
    pattern, an unsupported rope scaling) stops the export there, so say it before training."""
    from gguf import GGUFWriter

    try:
        fam.write_hparams(hp, GGUFWriter(None, fam.gguf_arch))  # no path: nothing touches the disk
    except UserError as e:
        reasons.append(_first_line(e))
    except (KeyError, TypeError, ValueError):
        pass  # an incomplete config.json: the converter names the missing key at export time


def _read_config(path: Path, reasons: list[str]) -> dict[str, Any] | None:
    cfg_path = path / "config.json"
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        reasons.append(f"{cfg_path} is missing, so the architecture is unknown")
        return None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        reasons.append(f"{cfg_path} cannot be read ({_first_line(e)})")
        return None
    if not isinstance(config, dict):
        reasons.append(f"{cfg_path} is not a JSON object")
        return None
    return config


def _tokenizer_check(path: Path, check: Any, reasons: list[str]) -> Any:
    """pretokenizer.check_pretokenizer(path), or None with the reason it could not run."""
    if importlib.util.find_spec("llama_cpp") is None:  # the check asks llama.cpp itself
        reasons.append(f"the tokenizer cannot be checked: {GGUF_EXTRA} (llama-cpp-python is not installed)")
        return None
    try:
        return check(path)
    except ImportError as e:  # llama-cpp-python (or sentencepiece/tokenizers) is not installed
        reasons.append(f"the tokenizer cannot be checked: {GGUF_EXTRA} ({e.name or e} is not installed)")
    except UserError as e:  # a missing extra ("... pip install 'qlocal[gguf]'") or an unreadable tokenizer
        msg = str(e)
        reasons.append(f"the tokenizer cannot be checked: {msg}" if "pip install" in msg else f"tokenizer: {msg}")
    except Exception as e:  # an odd tokenizer.json (wrong shapes, unknown model type): a reason, not a crash
        reasons.append(f"tokenizer: {path} cannot be converted ({type(e).__name__}: {_first_line(e)})")
    return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def preflight(model_path: Path, model: str, require: bool, main: bool) -> dict[str, Any]:
    """Before training: the verdict as resolved facts; a warning line on rank 0 when the model will
    not export, or a UserError when `require` (--require-export / model.require_export)."""
    v = export_verdict(model_path)
    if not v.ok and require:
        raise UserError(f"{v.line(model)}; --require-export (model.require_export) stops here, "
                        "drop it to train anyway")
    if not v.ok and main:
        print(f"warning: {v.line(model)}; training goes on (--require-export makes this an error)",
              file=sys.stderr)
    return {"exportable": v.ok, **({} if v.ok else {"export_reasons": v.reasons})}
