"""HF safetensors folder -> GGUF, on llama.cpp's `gguf` package alone (no torch, no llama.cpp checkout).

Streaming: a first pass reads only safetensors headers to plan every tensor (name, shape, type,
size) so the GGUF header can be written up front; a second pass reads each tensor from disk in row
chunks, converts it and appends it. Peak memory is one chunk (~64 MiB of float32) or, for tensors
that must be transformed whole (the llama q/k permute), one tensor, never the model.

Families and their quirks live in `gguf_arch.FAMILIES`; tokenizer metadata in `gguf_vocab`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qlocal import atomic
from qlocal.errors import UserError

log = logging.getLogger(__name__)

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
CHUNK_BYTES = 64 << 20  # float32 bytes converted at a time for row-chunked tensors
_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}


# ---------------------------------------------------------------- safetensors, read lazily

@dataclass(frozen=True)
class StTensor:
    """Where one tensor lives in a .safetensors file; `read` loads rows lazily as float32."""

    path: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file

    def read(self, row_start: int = 0, row_stop: int | None = None) -> np.ndarray:
        """Rows [row_start, row_stop) of the tensor as float32 (bf16 widened exactly)."""
        if self.dtype not in _ST_DTYPES:
            raise UserError(f"{self.path}: tensor dtype {self.dtype} cannot be exported to GGUF "
                            "(quantised checkpoints must be fused into a 16-bit base first)")
        np_dtype = np.dtype(_ST_DTYPES[self.dtype])
        shape = self.shape or (1,)
        row_stop = shape[0] if row_stop is None else row_stop
        row_elems = int(np.prod(shape[1:], dtype=np.int64))
        count = (row_stop - row_start) * row_elems
        with open(self.path, "rb") as f:
            # fromfile reads into an anonymous buffer: unlike mmap, pages do not linger in RSS.
            raw = np.fromfile(f, dtype=np_dtype, count=count,
                              offset=self.offset + row_start * row_elems * np_dtype.itemsize)
        if self.dtype == "BF16":
            out = np.empty(raw.shape, np.uint32)  # widened in one pass, not a cast then a shifted copy
            np.left_shift(raw, 16, out=out, dtype=np.uint32)
            out = out.view(np.float32)
        else:
            out = raw.astype(np.float32, copy=False)
        return out.reshape((row_stop - row_start, *shape[1:]) if self.shape else ())


def index_safetensors(hf_dir: Path) -> dict[str, StTensor]:
    """Every tensor of every *.safetensors file in `hf_dir` (sharded or not), headers only."""
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise UserError(f"{hf_dir}: no *.safetensors files (the GGUF export reads HF safetensors folders)")
    tensors: dict[str, StTensor] = {}
    for path in files:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            start = meta["data_offsets"][0]
            tensors[name] = StTensor(path, meta["dtype"], tuple(meta["shape"]), 8 + n + start)
    return tensors


# ---------------------------------------------------------------- the plan

@dataclass
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    qtype: Any                                   # gguf.GGMLQuantizationType
    rows: Callable[[int, int], np.ndarray]       # float32 rows [a, b) after transforms
    chunkable: bool                              # rows can be produced piecewise


def _qtype_for(name: str, shape: tuple[int, ...], outtype: str) -> Any:
    from gguf import GGMLQuantizationType as Q

    # llama.cpp keeps 1-D tensors (norms, biases), rope factors and the MoE router in F32.
    if len(shape) < 2 or outtype == "f32" or name.startswith("rope_freqs") or name.endswith("ffn_gate_inp.weight"):
        return Q.F32
    if outtype == "q8_0":
        # Q8_0 works in 32-element row blocks; llama.cpp falls back to F16 otherwise.
        return Q.Q8_0 if shape[-1] % 32 == 0 else Q.F16
    return {"f16": Q.F16, "bf16": Q.BF16}[outtype]


def _nbytes(shape: tuple[int, ...], qtype: Any) -> int:
    from gguf.quants import quant_shape_to_byte_shape

    # For F32/F16/BF16 the "block" is one element, so this is bytes for every type.
    return int(np.prod(quant_shape_to_byte_shape(shape, qtype), dtype=np.int64))


def _encode(data: np.ndarray, qtype: Any) -> np.ndarray:
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    if qtype == Q.F32:
        return data.astype(np.float32, copy=False)
    if qtype == Q.F16:
        from qlocal.export.casts import to_f16

        return to_f16(data)
    return quantize(np.ascontiguousarray(data, dtype=np.float32), qtype)


def plan_tensors(hf_dir: Path, hp: dict[str, Any], family: Any, outtype: str,
                 tensors: dict[str, Any] | None = None) -> list[PlannedTensor]:
    """Map every HF tensor to its GGUF name, shape, type and a lazy row reader (no data read).

    `tensors` (name -> object with `shape` and `read(a, b)`, e.g. merge.MergedTensor) replaces the
    folder's own safetensors: the fused export encodes the fp32 merge, not a rounded copy of it."""
    from gguf import get_tensor_name_map

    from qlocal.export.gguf_arch import hf_tensor_name, permute_qk

    n_layers = int(hp["num_hidden_layers"])
    name_map = get_tensor_name_map(family.arch, n_layers)
    # Only an explicitly tied lm_head is dropped; an untied one (or an unsure config) is kept.
    tied = hp.get("tie_word_embeddings") is True
    n_head = int(hp["num_attention_heads"])
    n_kv = int(hp.get("num_key_value_heads") or n_head)
    plan: list[PlannedTensor] = []
    source = tensors if tensors is not None else index_safetensors(hf_dir)
    if family.regroup is not None:
        source = family.regroup(source, hp)
    for src, st in source.items():
        hf_name = hf_tensor_name(src)
        if hf_name is None or (hf_name == "lm_head.weight" and tied):
            continue  # llama.cpp falls back to token_embd for a tied output
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise UserError(f"{hf_dir}: tensor {src!r} has no GGUF name for {family.name}; "
                            "is this checkpoint a standard HF export?")
        transform: Callable[[np.ndarray], np.ndarray] | None = None
        if family.permute_qk and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            transform = lambda x: permute_qk(x, n_head)  # noqa: E731
        elif family.permute_qk and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            transform = lambda x: permute_qk(x, n_kv)  # noqa: E731
        shift = family.norm_shift if hf_name.endswith("norm.weight") else 0.0
        plan.append(_planned(gguf_name, st, transform, shift, outtype))
    for name, arr in family.extra_tensors(hp):
        plan.append(PlannedTensor(name, arr.shape, _qtype_for(name, arr.shape, outtype),
                                  lambda a, b, arr=arr: arr[a:b], True))
    return plan


def _planned(name: str, st: StTensor, transform: Callable[[np.ndarray], np.ndarray] | None,
             shift: float, outtype: str) -> PlannedTensor:
    def rows(a: int, b: int) -> np.ndarray:
        x = st.read(a, b) if transform is None else transform(st.read())[a:b]
        return x + np.float32(shift) if shift else x

    return PlannedTensor(name, st.shape, _qtype_for(name, st.shape, outtype), rows, transform is None)


# ---------------------------------------------------------------- the converter

def convert_hf_to_gguf(hf_dir: Path, out_path: Path, outtype: str = "f16",
                       chat_template: str | None = None, name: str | None = None,
                       pretokenizer: Any = None, allow_tokenizer_mismatch: bool = False,
                       tensors: dict[str, Any] | None = None) -> Path:
    """Convert an HF safetensors model folder to a GGUF file at `out_path` and return the path.

    outtype: f32 | f16 | bf16 | q8_0 (1-D tensors stay f32, as llama.cpp does). `chat_template`
    (the run's template) replaces the tokenizer's own in `tokenizer.chat_template`. `name` goes
    into general.name (default: the folder name). Unsupported families raise a one-line UserError
    listing the supported ones. The file is written to a temporary name and renamed at the end.

    `tokenizer.ggml.pre` comes from `pretokenizer` (a pretokenizer.PreTokenizerCheck, made once
    per export), else from a fresh check; a tokenizer llama.cpp cannot reproduce is a UserError
    unless `allow_tokenizer_mismatch`. `tensors` (see plan_tensors) are the weights to write
    instead of the folder's; config and tokenizer still come from `hf_dir`.
    """
    import gguf

    from qlocal.export.gguf_arch import find_family, general_name, text_hparams
    from qlocal.export.gguf_vocab import write_vocab
    from qlocal.export.pretokenizer import check_pretokenizer

    hf_dir, out_path = Path(hf_dir), Path(out_path)
    if outtype not in OUTTYPES:
        raise UserError(f"unknown GGUF outtype {outtype!r}; choose one of {', '.join(OUTTYPES)} "
                        "(K-quants are made from the f16 file by the quantize step)")
    cfg_path = hf_dir / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"{hf_dir}: no config.json; expected an HF model folder")
    config = json.loads(cfg_path.read_text(encoding="utf-8"))
    family = find_family(config)
    hp = text_hparams(config)
    if pretokenizer is None:
        pretokenizer = check_pretokenizer(hf_dir)
        pretokenizer.require(allow_tokenizer_mismatch)
        if not pretokenizer.matched:
            log.warning("%s; writing it anyway (allow_tokenizer_mismatch)", pretokenizer.line())
    plan = plan_tensors(hf_dir, hp, family, outtype, tensors)
    embd = next((t for t in plan if t.name == "token_embd.weight"), None)

    with open_writer(out_path, family.gguf_arch) as writer:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(general_name(name or hf_dir.name))
        writer.add_file_type(_file_type(outtype))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        family.write_hparams(hp, writer)
        write_vocab(writer, hf_dir, embd.shape[0] if embd else hp.get("vocab_size"), chat_template,
                    pre=pretokenizer.pre)
        for t in plan:
            writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), _nbytes(t.shape, t.qtype),
                                   raw_dtype=t.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        _write_tensors(writer, plan)
    return out_path


@contextlib.contextmanager
def open_writer(out_path: Path, arch: str) -> Iterator[Any]:
    """A gguf.GGUFWriter on a temp file that becomes `out_path` when the block ends normally."""
    import gguf

    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic.writing(out_path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        try:
            yield writer
        finally:
            writer.close()  # before the rename: it flushes the last bytes


def _file_type(outtype: str) -> int:
    from gguf import LlamaFileType as F

    return int({"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0}[outtype])


def _write_tensors(writer: Any, plan: list[PlannedTensor]) -> None:
    """Append every tensor's data, row chunk by row chunk, with GGUF's alignment padding. Chunks are
    read and encoded one step ahead in a thread while the last one is written: file reads and writes
    release the GIL, so on a 2-core box the disk time hides behind the conversion."""
    fout = writer.fout[0]
    current, written = None, 0
    for t, enc in _prefetched(((t, _encode(chunk, t.qtype)) for t in plan for chunk in _chunks(t)), depth=2):
        if t is not current:
            if current is not None:
                _end_tensor(writer, current, written)
            current, written = t, 0
            writer.write_padding(fout, fout.tell())
        atomic.write_array(fout, np.ascontiguousarray(enc))
        written += enc.nbytes
    if current is not None:
        _end_tensor(writer, current, written)


def _end_tensor(writer: Any, t: PlannedTensor, written: int) -> None:
    expected = _nbytes(t.shape, t.qtype)
    if written != expected:
        raise RuntimeError(f"{t.name}: wrote {written} bytes, planned {expected}")
    writer.write_padding(writer.fout[0], written)


def _prefetched(items: Iterator[Any], depth: int) -> Iterator[Any]:
    """`items`, produced by a thread at most `depth` ahead of the consumer. The producer's error is
    raised here; if the consumer stops early (an error while writing), the producer stops too."""
    import queue
    import threading

    q: queue.Queue[tuple[bool, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def send(item: tuple[bool, Any]) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not send((True, item)):
                    return
            send((False, None))
        except BaseException as e:  # handed to the consumer, which raises it
            send((False, e))

    thread = threading.Thread(target=produce, name="gguf-encode", daemon=True)
    thread.start()
    try:
        while True:
            more, item = q.get()
            if not more:
                if item is not None:
                    raise item
                return
            yield item
    finally:
        stop.set()
        thread.join()


def _chunks(t: PlannedTensor) -> Iterator[np.ndarray]:
    n_rows = t.shape[0] if t.shape else 1
    if not t.shape:
        yield t.rows(0, 1).reshape(())
        return
    row_bytes = 4 * int(np.prod(t.shape[1:], dtype=np.int64))
    step = n_rows if not t.chunkable else max(1, CHUNK_BYTES // max(row_bytes, 1))
    for a in range(0, n_rows, step):
        yield t.rows(a, min(a + step, n_rows))
