"""Streaming LoRA merge: base safetensors + PEFT adapter -> merged fp32 tensors, one row chunk at a time.

W' = W + scale * B @ A is computed in float32 from the original 16/32-bit base, read lazily from
its shards (gguf.index_safetensors: headers first, then rows on demand). Rows of W' depend only on
the same rows of B, so a merged tensor is produced piecewise like any other: the merge never holds
more than one tensor (usually one chunk) and its fp32 copy. Both the GGUF writer and the fused HF
folder read from these merged values, so the GGUF is encoded from fp32, never from a rounded copy.

Trained rows of added tokens (PEFT trainable_token_indices) replace those rows of the embedding and
head; ids past the base's rows grow the tensor (the fused vocabulary holds the added tokens).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qlocal import atomic
from qlocal.errors import UserError

FUSED_DTYPES = ("auto", "float32", "bfloat16", "float16")
_ST_NAME = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
CHUNK_BYTES = 16 << 20  # float32 bytes merged and written at a time (a few temporaries of this size)


@dataclass(frozen=True)
class MergedTensor:
    """One base tensor with its LoRA update (if any), read as float32 rows like gguf.StTensor."""

    base: Any  # gguf.StTensor
    lora_a: np.ndarray | None = None  # (r, in)
    lora_b: np.ndarray | None = None  # (out, r)
    scale: float = 0.0
    token_ids: tuple[int, ...] = ()
    token_rows: np.ndarray | None = None  # (len(token_ids), hidden): those rows' trained values
    n_rows: int | None = None  # rows after adding tokens (None: the base's)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.base.shape if self.n_rows is None else (self.n_rows, *self.base.shape[1:])

    @property
    def dtype(self) -> str:
        return self.base.dtype

    def read(self, row_start: int = 0, row_stop: int | None = None) -> np.ndarray:
        """Rows [row_start, row_stop) of W + scale * B @ A in float32 (token rows replaced)."""
        if self.token_rows is not None:
            return self._read_rows(row_start, self.shape[0] if row_stop is None else row_stop)
        x = self.base.read(row_start, row_stop)
        if self.lora_a is None or self.lora_b is None:
            return x
        stop = self.shape[0] if row_stop is None else row_stop
        delta = self.lora_b[row_start:stop] @ self.lora_a
        delta *= np.float32(self.scale)
        if not x.flags.writeable:
            x = x.copy()
        x += delta  # in place: one fp32 temporary, not two
        return x


    def _read_rows(self, start: int, stop: int) -> np.ndarray:
        n0 = self.base.shape[0]
        parts = [self.base.read(start, min(stop, n0))] if start < n0 else []
        if stop > n0:  # rows the base lacks; every one of them is a trained token row
            parts.append(np.zeros((stop - max(start, n0), *self.base.shape[1:]), np.float32))
        x = np.concatenate(parts) if len(parts) > 1 else np.array(parts[0], dtype=np.float32)
        for i, t in enumerate(self.token_ids):
            if start <= t < stop:
                x[t - start] = self.token_rows[i]
        return x


def _token_rows(adapter_dir: Path) -> dict[str, tuple[list[int], np.ndarray]]:
    """Module path -> (token ids, their trained rows) of an adapter with trainable_token_indices."""
    from qlocal.adapters import PEFT_ROWS_KEY, read_peft_adapter, token_rows

    config, weights = read_peft_adapter(adapter_dir)
    ids_by_leaf = token_rows(config)
    out = {}
    for name, w in weights.items():
        m = PEFT_ROWS_KEY.match(name)
        if m is None:
            continue
        leaf = m["path"].rsplit(".", 1)[-1]
        ids = ids_by_leaf.get(leaf)
        if ids is None or len(ids) != w.shape[0]:
            raise UserError(f"{adapter_dir}: {name} holds {w.shape[0]} rows but adapter_config.json's "
                            f"trainable_token_indices names {ids} for {leaf}")
        out[m["path"]] = (ids, np.asarray(w, dtype=np.float32))
    return out


def _adapter_modules(adapter_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """Module path -> (A float32, B float32, PEFT scale), with clear errors for what we cannot merge."""
    from qlocal.adapters import _PEFT_KEY, CONFIG_FILE, PEFT_ROWS_KEY, lora_scale, read_peft_adapter

    config, weights = read_peft_adapter(adapter_dir)
    cfg_path = Path(adapter_dir) / CONFIG_FILE
    if config.get("fan_in_fan_out"):
        raise UserError(f"{cfg_path}: fan_in_fan_out adapters (GPT-2 style Conv1D layers) cannot be merged "
                        "by the streaming merge; train LoRA on nn.Linear layers")
    if config.get("modules_to_save"):
        raise UserError(f"{cfg_path}: modules_to_save ({config['modules_to_save']}) is not supported by the merge; "
                        "train with LoRA on linear layers only")
    parts: dict[str, dict[str, np.ndarray]] = {}
    for name, w in weights.items():
        m = _PEFT_KEY.match(name)
        if m is None and PEFT_ROWS_KEY.match(name):
            continue  # trained token rows (_token_rows)
        if m is None:
            raise UserError(f"{adapter_dir}: adapter tensor '{name}' is not a LoRA A/B matrix; "
                            "only LoRA on linear layers can be merged")
        parts.setdefault(m["path"], {})[m["ab"]] = np.asarray(w, dtype=np.float32)
    out = {}
    for path, ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise UserError(f"{adapter_dir}: {path} has only one of lora_A / lora_B")
        a, b = ab["A"], ab["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise UserError(f"{adapter_dir}: {path} lora_A {a.shape} and lora_B {b.shape} are not a LoRA pair")
        out[path] = (a, b, lora_scale(config, path, a.shape[0]))
    return out


def merged_tensors(base_path: Path, adapter_dir: Path) -> dict[str, MergedTensor]:
    """Every tensor of the base folder, the adapted ones with their LoRA update (lazily; nothing read yet).

    PEFT names `base_model.model.<module>.lora_A.weight` update the base tensor `<module>.weight`."""
    from qlocal.export.gguf import index_safetensors

    index = index_safetensors(Path(base_path))
    out = {name: MergedTensor(st) for name, st in index.items()}
    from qlocal.export.merge_experts import expand_expert_lora

    # LoRA on stacked MoE experts (PEFT target_parameters) becomes one pair per expert tensor on disk.
    for path, (a, b, scale) in expand_expert_lora(_adapter_modules(Path(adapter_dir)), index, Path(adapter_dir)).items():
        key = f"{path}.weight"
        st = index.get(key)
        if st is None:
            raise UserError(f"{adapter_dir}: adapter module {path} has no tensor {key} in base {base_path}; "
                            "the adapter was trained on a different model")
        if st.shape != (b.shape[0], a.shape[1]):
            raise UserError(f"{adapter_dir}: {path} LoRA shape ({b.shape[0]}, {a.shape[1]}) does not fit "
                            f"base tensor {key} {st.shape}")
        out[key] = MergedTensor(st, a, b, scale)
    rows = _token_rows(Path(adapter_dir))
    n_rows = max([max(ids) + 1 for ids, _ in rows.values()] + [index[f"{p}.weight"].shape[0] for p in rows
                                                              if f"{p}.weight" in index], default=0)
    if rows and "lm_head.weight" in index and "lm_head" not in rows:
        rows["lm_head"] = next(iter(rows.values()))  # a tied head stored twice: the same rows
    for path, (ids, values) in rows.items():
        key = f"{path}.weight"
        if key not in index or out[key].lora_a is not None or index[key].shape[1:] != values.shape[1:]:
            raise UserError(f"{adapter_dir}: trained token rows of {path} do not fit base tensor {key} "
                            f"{index[key].shape if key in index else '(absent)'}; the adapter was trained on a different model")
        out[key] = MergedTensor(index[key], token_ids=tuple(ids), token_rows=values, n_rows=n_rows)
    return out


def vocab_size(tensors: dict[str, MergedTensor]) -> int | None:
    """Rows of the embedding after added tokens, when the adapter grew the vocabulary (else None)."""
    return next((t.shape[0] for t in tensors.values() if t.n_rows is not None), None)


def row_chunks(t: Any, pool: Any = None) -> Iterator[np.ndarray]:
    """A tensor's float32 rows in chunks of about CHUNK_BYTES; with `pool` (a weight_pool.WeightPool)
    each chunk is in its reused buffer, valid until the next chunk is read."""
    if not t.shape:
        yield t.read().reshape(())
        return
    n_rows = t.shape[0]
    row_bytes = 4 * int(np.prod(t.shape[1:], dtype=np.int64))
    step = max(1, CHUNK_BYTES // max(row_bytes, 1))
    for a in range(0, n_rows, step):
        yield t.read(a, min(a + step, n_rows)) if pool is None else pool.read("chunk", t, a, min(a + step, n_rows))


def encode(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 -> the bytes of `dtype` (bfloat16 rounded to nearest even, NaN kept a NaN)."""
    from qlocal.export.casts import to_bf16_bits, to_f16

    if dtype == "float32":
        return np.ascontiguousarray(x, dtype=np.float32)
    if dtype == "float16":
        return to_f16(x)
    return to_bf16_bits(x)


def write_safetensors(tensors: dict[str, Any], base_path: Path, out_dir: Path, dtype: str) -> int:
    """Write the (merged) tensors into `out_dir` in `dtype`, shard for shard as the base is laid out.

    The header is written first from the shapes, then each tensor chunk by chunk: peak memory is one
    chunk. Returns the total bytes of tensor data. `out_dir` is a folder being built atomically."""
    from qlocal.export.weight_pool import WeightPool

    pool = WeightPool()  # each chunk is encoded and written before the next is read
    itemsize = 4 if dtype == "float32" else 2
    by_file: dict[str, list[str]] = {}
    for name, t in tensors.items():
        by_file.setdefault(t.base.path.name, []).append(name)
    total = 0
    for fname, names in sorted(by_file.items()):
        names.sort()
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name in names:
            shape = list(tensors[name].shape)
            size = int(np.prod(shape, dtype=np.int64)) * itemsize
            header[name] = {"dtype": _ST_NAME[dtype], "shape": shape, "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # safetensors aligns the data start to 8 bytes
        with open(out_dir / fname, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for name in names:
                for chunk in row_chunks(tensors[name], pool):
                    atomic.write_array(f, encode(chunk, dtype))
        total += offset
    index = base_path / "model.safetensors.index.json"
    if index.is_file():
        doc = json.loads(index.read_text(encoding="utf-8"))
        doc["metadata"] = {**doc.get("metadata", {}), "total_size": total}
        doc["weight_map"] = {name: t.base.path.name for name, t in sorted(tensors.items())}
        (out_dir / index.name).write_text(json.dumps(doc, indent=2), encoding="utf-8")
    return total


def fused_config(base_path: Path, dtype: str, vocab: int | None = None) -> dict[str, Any]:
    """The base's config.json with its dtype set to the fused folder's (text_config too, if present),
    and `vocab` as its vocab_size when added tokens grew it."""
    cfg = json.loads((Path(base_path) / "config.json").read_text(encoding="utf-8"))
    for c in (cfg, cfg.get("text_config")):
        if isinstance(c, dict):
            c.pop("torch_dtype", None)
            c["dtype"] = dtype
            if vocab is not None and "vocab_size" in c:
                c["vocab_size"] = vocab
    cfg["use_cache"] = True
    return cfg
