"""Read records from disk or the hub: (record, location) pairs, each bad line named.

.jsonl, .json (an array, {"data": [...]}, one object, or JSON Lines), .csv (a header row),
.parquet (pyarrow), a `datasets` save_to_disk folder, or a hub dataset id. Each record carries a
location string ("file:LINE", "file:[i]", "file:row N") so that later errors name where it is.
Format detection and normalisation are qlocal.data.formats'. No torch/mlx imports here.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from qlocal import hf
from qlocal.data.loader import SKIP_HINT
from qlocal.errors import UserError

EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")


def _decode_lines(data: bytes, path: str) -> list[str]:
    """Split into lines and decode each as UTF-8, naming the first line that is not."""
    if data.startswith(b"\xef\xbb\xbf"):  # a BOM from Windows editors is harmless
        data = data[3:]
    lines = data.split(b"\n")
    out = []
    for i, raw in enumerate(lines, 1):
        try:
            out.append(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise UserError(f"{path}:{i}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                            "re-save the file as UTF-8") from None
    return out


def _json_error(e: json.JSONDecodeError) -> str:
    return f"{e.msg}: column {e.colno}"


def _parse_jsonl(lines: list[str], path: str, skipped: list[str] | None) -> list[tuple[Any, str]]:
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append((json.loads(line), f"{path}:{i}"))
        except json.JSONDecodeError as e:
            if skipped is not None:
                skipped.append(f"{path}:{i}")
                continue
            raise UserError(f"{path}:{i}: not valid JSON ({_json_error(e)}); fix the line or pass --skip-bad-lines") from None
    return out


def _load_json(lines: list[str], path: str, skipped: list[str] | None) -> list[tuple[Any, str]]:
    text = "\n".join(lines)
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        # A .json file holding JSON Lines is common; treat it as such when its first line parses.
        first = next((ln for ln in lines if ln.strip()), "")
        try:
            json.loads(first)
        except json.JSONDecodeError:
            raise UserError(f"{path}:{e.lineno}: not valid JSON ({_json_error(e)}); fix the file") from None
        return _parse_jsonl(lines, path, skipped)
    if isinstance(doc, dict) and isinstance(doc.get("data"), list):
        doc = doc["data"]
    if isinstance(doc, list):
        return [(rec, f"{path}:[{i}]") for i, rec in enumerate(doc)]
    return [(doc, f"{path}:1")]


def _load_csv(lines: list[str], path: str, skipped: list[str] | None = None) -> list[tuple[Any, str]]:
    reader = csv.DictReader(io.StringIO("\n".join(lines)))
    out = []
    start = 2  # line 1 is the header
    try:
        for row in reader:
            if None in row:  # more cells than header columns
                raise UserError(f"{path}:{start}: more cells than the header has columns; quote cells that contain commas")
            short = [k for k, v in row.items() if v is None]  # fewer cells: DictReader leaves the rest None
            if short and skipped is not None:
                skipped.append(f"{path}:{start}")
            elif short:
                raise UserError(f"{path}:{start}: fewer cells than the header has columns (no {', '.join(short)}); "
                                "add the missing cells (empty ones too: `a,` has two) or pass --skip-bad-lines")
            else:
                out.append(({k: v for k, v in row.items() if k is not None}, f"{path}:{start}"))
            start = reader.line_num + 1  # quoted cells may span lines
    except csv.Error as e:
        raise UserError(f"{path}:{reader.line_num}: not valid CSV ({e}); fix the line") from None
    if reader.fieldnames is None:
        raise UserError(f"{path}: empty file; it needs a header row and at least one record")
    return out


def _load_parquet(path: str) -> list[tuple[Any, str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{path}: reading .parquet needs pyarrow: pip install 'qlocal[data]'") from None
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises many types for a corrupt file
        raise UserError(f"{path}: not a readable parquet file ({e})") from None
    return [(r, f"{path}:row {i}") for i, r in enumerate(rows)]


def _load_hub(name: str, split: str) -> list[tuple[Any, str]]:
    try:
        import datasets
    except ImportError:
        raise UserError(f"{name}: not a local file, and loading hub datasets needs `datasets`: "
                        "pip install 'qlocal[data]'") from None
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{name}: no such local file, and loading it as a hub dataset failed ({msg}); "
                        "check the path or the dataset id and split (data.split)") from None
    return [(dict(r), f"{name}[{split}]:row {i}") for i, r in enumerate(ds)]


def _load_saved_dataset(path: str, split: str) -> list[tuple[Any, str]]:
    """A folder written by `datasets`' save_to_disk (a Dataset, or a DatasetDict holding `split`)."""
    try:
        import datasets
    except ImportError:
        raise UserError(f"{path}: reading a saved dataset folder needs `datasets`: pip install 'qlocal[data]'") from None
    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise UserError(f"{path}: has no split '{split}' (has {', '.join(ds)}); set data.split")
        ds = ds[split]
    return [(dict(r), f"{path}[{split}]:row {i}") for i, r in enumerate(ds)]


def looks_like_hub_id(path: str) -> bool:
    """True for a dataset `org/name` that is not a local path (no data file extension, no local folder)."""
    return hf.looks_like_hub_id(path) and not path.lower().endswith(EXTENSIONS + (".txt",))


def load_records(path: str, split: str = "train", skipped: list[str] | None = None) -> list[tuple[dict, str]]:
    """Read every record of a .jsonl/.json/.csv/.parquet file, a saved `datasets` folder or a hub dataset id.

    Returns (record, location) pairs. When `skipped` is a list, malformed lines and non-object
    records are appended to it (by location) instead of raising.
    """
    p = Path(path)
    if not p.exists():
        if looks_like_hub_id(path):
            pairs = _load_hub(path, split)
        else:
            raise UserError(f"{path}: file not found; check data.path (or --data), "
                            "or give a hub dataset id like org/name")
    elif p.is_dir() and ((p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file()):
        pairs = _load_saved_dataset(path, split)
    elif p.is_dir():
        raise UserError(f"{path}: is a folder; point data.path at a .jsonl, .json, .csv or .parquet file")
    else:
        suffix = p.suffix.lower()
        if suffix not in EXTENSIONS:
            raise UserError(f"{path}: unsupported file type '{suffix or '(none)'}'; "
                            "use .jsonl, .json, .csv or .parquet (plain text goes in .jsonl as {\"text\": ...})")
        if suffix == ".parquet":
            pairs = _load_parquet(path)
        else:
            lines = _decode_lines(p.read_bytes(), path)
            if not any(ln.strip() for ln in lines):
                raise UserError(f"{path}: empty file; it needs at least one record")
            if suffix == ".jsonl":
                pairs = _parse_jsonl(lines, path, skipped)
            elif suffix == ".json":
                pairs = _load_json(lines, path, skipped)
            else:
                pairs = _load_csv(lines, path, skipped)
    out = []
    for rec, where in pairs:
        if not isinstance(rec, dict):
            if skipped is not None:
                skipped.append(where)
                continue
            raise UserError(f"{where}: a record must be a JSON object with keys like instruction/output, "
                            f"messages or text, got {type(rec).__name__}; {SKIP_HINT}")
        out.append((rec, where))
    if not out:
        raise UserError(f"{path}: no records found (every record was empty or skipped)")
    return out
