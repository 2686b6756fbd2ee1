"""Choose `tokenizer.ggml.pre` by behaviour: llama.cpp must tokenise a probe corpus exactly as HF does.

Names, regexes and hashes do not say how llama.cpp will split text, so for a byte-level BPE
vocabulary each pre-tokenizer llama.cpp implements is tried: a vocab-only GGUF is written with that
name, llama-cpp-python loads it (`vocab_only=True`), tokenises `PROBES`, and the ids are compared
with the `tokenizers` library's on tokenizer.json. The name the tokenizer.json regex suggests is
tried first and kept when it matches; otherwise the first match in `CANDIDATES` order. When none
matches, the closest one (fewest differing probes) is reported and the export stops unless the
user allows the mismatch. SentencePiece-style vocabularies keep "default" and take the same check.

Speed: the probe GGUF holds only the tokens the probes can reach. BPE only ever forms a token
that is a substring of the text it merges (and falls back to single bytes), so tokenising the
probes with that sub-vocabulary (merges kept in rank order, ids mapped back) gives the very same
tokens as the whole one, while writing and loading a 150k vocabulary once per candidate would cost
about 1.7 s and 0.35 s each (see tests/test_pretokenizer.py, which checks both agree).
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qlocal import atomic
from qlocal.errors import UserError
from qlocal.export.gguf_vocab import (is_sentencepiece_style, read_json, suggest_pre, write_tokenizer_json,
                                      write_vocab)

LLAMA_CPP_SOURCE = ("ggml-org/llama.cpp src/llama-vocab.cpp @ 00ad355e "
                    "(llama-cpp-python 0.3.36's libllama has each name)")
"""Where CANDIDATES were read: llama_vocab::impl::load maps these names to LLAMA_VOCAB_PRE_TYPE_*."""

CANDIDATES: tuple[str, ...] = (
    # One name per distinct behaviour (regex set, ignore_merges) of a byte-level pre-tokenizer; names
    # that map to the same LLAMA_VOCAB_PRE_TYPE and flags are left out (stablelm2/hunyuan = qwen2,
    # dbrx/chatglm-bpe = smaug-bpe, smollm/refact/command-r = starcoder, mpt/olmo/jais = gpt-2, ...).
    # gemma4, sarvam-moe and whitespace are not byte-level (raw UTF-8) and are not candidates.
    # The order is the tie-break after the regex's suggestion: the common families first.
    "llama-bpe",     # LLAMA3: \p{N}{1,3}, ignore_merges
    "qwen2",         # QWEN2: single digits
    "gpt-2",         # GPT2: plain ByteLevel(use_regex=True)
    "tekken",        # TEKKEN: case-split words, ignore_merges
    "starcoder",     # STARCODER: digits isolated, then the GPT-2 regex
    "smaug-bpe",     # SMAUG: the Llama 3 regex without ignore_merges
    "qwen35",        # QWEN35: letters with marks
    "gpt-4o",        # GPT4O: case-split words with contractions, \p{N}{1,3}
    "deepseek-v3",
    "deepseek-llm",
    "deepseek-coder",
    "falcon",
    "default",
    "jais-2",
    "spark2_5",
    "youtu",
    "bloom",
    "viking",
    "chameleon",
    "granite-embed-multi-97m",
    "tiny_aya",
    "kimi-k2",
    "superbpe",
    "bailingmoe",
    "seed-coder",
    "ufakzeka",
    "afmoe",
    "laguna",
    "exaone-moe",
    "minicpm5",
)

PROBES: tuple[str, ...] = (
    # NFC text only: llama.cpp applies no normalizer, and real tokenizers (Qwen's NFC) would then
    # differ on decomposed input whatever the pre-tokenizer.
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "7 42 314 2025 12345 1234567 3.14159265358979 1,000,000 -0.5e-10 0x1F 007",
    "Order #12345678901234567890 costs $1,234.56 (or 1234,56 €) on 2024-06-01 at 13:45:07.",
    "你好，世界。机器学习是人工智能的一个分支。北京2008年",
    "日本語のテキストとカタカナ、한국어 문장입니다.",
    "naïve café Straße Ελληνικά русский текст עברית العربية हिन्दी ไทย Cửa Việt",
    "mixed日本English中文123abc한국어",
    "a  b   c    d     e\n\n\nf\r\ng\r\n\r\nh \n \n i   \n\n   ",
    "\tindented\t\ttabs \t mixed\t\n\t\t  deep",
    "def f(x):\n    return x ** 2  # square\n\nif (a != b) { c->d[0] += 1; } else { y = -x; }\n",
    "    for (int i = 0; i < n; ++i) {\n        sum += a[i] * b[i];\n    }",
    "Wait... what?! (yes) [no] {maybe} <tag attr=\"v\"/> a/b\\c @#$%^&*_+=~`| --- === !!! ??? ''' \"\"\"",
    "I ❤️ emoji 🙂👍🏽 🇫🇷 👩‍💻 🦙🦙 ✅",
    "It's, we're, they've, I'll, she'd, don't, I'M, WE'RE, THEY'VE, 'quoted', rock'n'roll, y'all",
    "   leading spaces and trailing spaces   ",
    " one leading space",
    "HTTPServer getHTTPResponseCode iPhone McDonald's XMLHttpRequest camelCaseWord ALLCAPS",
    "https://example.com/path/to/page?q=1&r=two#frag user@example.org",
    "   \n",
)


@dataclass
class PreTokenizerCheck:
    """Which pre-tokenizer the GGUF gets and how llama.cpp's tokenisation compares with HF's."""

    pre: str
    """tokenizer.ggml.pre written (the match, else the closest; "default" for SentencePiece)."""
    suggested: str
    """The name tried first (the regex's suggestion)."""
    matched: bool
    probes: int
    differ: int
    """Probes whose ids differ with `pre` (0 when matched)."""
    example: str | None
    """One differing probe, briefly."""
    tried: dict[str, Any] = field(default_factory=dict)
    """name -> differing probes, or llama.cpp's reason for refusing the name."""
    seconds: float = 0.0
    vocab_tokens: int = 0
    """Tokens in the probe vocabulary (the sub-vocabulary the probes can reach)."""
    source: str = LLAMA_CPP_SOURCE
    allowed_mismatch: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for export.json / verify.json."""
        return asdict(self)

    def line(self) -> str:
        """One line saying what was chosen and how it compares."""
        if self.matched:
            return (f"tokenizer: llama.cpp pre-tokenizer {self.pre!r} tokenises all {self.probes} probes as HF does "
                    f"({len(self.tried)} tried, {self.seconds:.2f}s)")
        return (f"tokenizer: no llama.cpp pre-tokenizer tokenises like HF: {self.differ}/{self.probes} probes differ "
                f"with the closest, {self.pre!r} (e.g. {self.example})")

    def require(self, allow: bool) -> None:
        """UserError (the one line) on a mismatch unless `allow` (--allow-tokenizer-mismatch)."""
        if self.matched:
            return
        if not allow:
            raise UserError(f"{self.line()}; the GGUF would tokenise differently. "
                            "--allow-tokenizer-mismatch exports it anyway")
        self.allowed_mismatch = True


def check_pretokenizer(hf_dir: Path) -> PreTokenizerCheck:
    """Choose the llama.cpp pre-tokenizer for the tokenizer in `hf_dir` by behaviour (module docstring)."""
    t0 = time.perf_counter()
    hf_dir = Path(hf_dir)
    tj_path = hf_dir / "tokenizer.json"
    tok_config = read_json(hf_dir / "tokenizer_config.json")
    old_ids: list[int] | None = None  # sub-vocabulary id -> original id
    if tj_path.is_file():
        text = tj_path.read_text(encoding="utf-8")
        reference = _hf_ids(tj_path, text)
        tj = json.loads(text)
        spm = is_sentencepiece_style(tj)
        sub, old_ids = probe_vocabulary(tj, spm)

        def write(w: Any, pre: str) -> Any:
            # Special-token ids from config.json would point elsewhere in the sub-vocabulary; the probes
            # add no BOS/EOS and parse no special tokens, so only their texts (tokenizer_config) count.
            # A copy of the model: the writer may drop its merges.
            return write_tokenizer_json(w, {**sub, "model": dict(sub["model"])}, tok_config, {}, None, pre)

        order = ["default"] if spm else _order(suggest_pre(tj))
    elif (hf_dir / "tokenizer.model").is_file():
        reference = _sentencepiece_ids(hf_dir / "tokenizer.model")

        def write(w: Any, pre: str) -> Any:
            return write_vocab(w, hf_dir, None)

        order = ["default"]
    else:
        raise UserError(f"{hf_dir}: no tokenizer.json or tokenizer.model; the GGUF needs the tokenizer")

    tried: dict[str, Any] = {}
    results: dict[str, list[list[int]]] = {}
    n_tokens = 0
    with atomic.scratch(Path(tempfile.gettempdir()) / "qlocal-pretokenizer-probe.gguf") as path:
        for name in order:
            n_tokens = _write_probe_gguf(path, write, name)
            ids = _llama_ids(path, old_ids)
            if isinstance(ids, str):
                tried[name] = ids
                continue
            results[name] = ids
            tried[name] = sum(a != b for a, b in zip(ids, reference))
            if tried[name] == 0:
                break
    if not results:
        raise UserError(f"{hf_dir}: llama.cpp cannot load this tokenizer's GGUF vocabulary: {tried[order[0]]}")
    best = min(results, key=lambda n: (tried[n], order.index(n)))
    diff = [i for i, (a, b) in enumerate(zip(results[best], reference)) if a != b]
    example = _example(PROBES[diff[0]], reference[diff[0]], results[best][diff[0]]) if diff else None
    return PreTokenizerCheck(best, order[0], not diff, len(PROBES), len(diff), example, tried,
                             round(time.perf_counter() - t0, 3), n_tokens)


def _order(suggested: str) -> list[str]:
    return [suggested, *(c for c in CANDIDATES if c != suggested)]


def _hf_ids(path: Path, text: str) -> list[list[int]]:
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_str(text)
    except Exception as e:  # the library's own parse errors carry no type of their own
        raise UserError(f"{path}: the tokenizers library cannot read it ({str(e).splitlines()[0]})") from None
    return [e.ids for e in tok.encode_batch(list(PROBES), add_special_tokens=False)]


def _sentencepiece_ids(path: Path) -> list[list[int]]:
    try:
        import sentencepiece
    except ImportError:
        raise UserError(f"{path.parent}: only tokenizer.model found; pip install sentencepiece") from None
    sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    return [list(sp.encode(p)) for p in PROBES]


def probe_vocabulary(tj: dict[str, Any], spm: bool) -> tuple[dict[str, Any], list[int]]:
    """A copy of tokenizer.json that keeps only the tokens the probes can reach, renumbered from 0,
    and each kept token's original id (module docstring: why the tokens come out the same).

    Kept: every added token, every vocab token that is a substring of some probe (in the vocab's own
    alphabet: GPT-2 byte characters, or ▁ for spaces), SentencePiece byte tokens and unk; merges
    whose result is kept, in their original order.
    """
    model = tj["model"]
    if spm:
        blob = "\x00".join(f"\u2581{p}".replace(" ", "\u2581") for p in PROBES)
    else:
        chars = _byte_chars()
        blob = "\x00".join("".join(chars[b] for b in p.encode("utf-8")) for p in PROBES)
    unigram = model["type"] == "Unigram"
    text_of = dict(enumerate(p for p, _ in model["vocab"])) if unigram else {i: t for t, i in model["vocab"].items()}
    kept_set = {a["id"] for a in tj.get("added_tokens", [])} | {i for i, t in text_of.items() if t in blob}
    if spm:
        unk = model.get("unk_token")
        kept_set |= {i for i, t in text_of.items() if t == unk or _BYTE_TOKEN.fullmatch(t)}
    kept = sorted(kept_set)
    new_id = {old: new for new, old in enumerate(kept)}
    sub_model = dict(model)
    if unigram:
        sub_model["vocab"] = [model["vocab"][i] for i in kept if i in text_of]
        if isinstance(model.get("unk_id"), int):
            sub_model["unk_id"] = new_id.get(model["unk_id"])
    else:
        vocab = {t: new_id[i] for t, i in model["vocab"].items() if i in new_id}
        sub_model["vocab"] = vocab
        merges = model.get("merges") or []
        sub_model["merges"] = [m for m in merges
                               if (m.replace(" ", "") if isinstance(m, str) else "".join(m)) in vocab]
    added_tokens = [{**a, "id": new_id[a["id"]]} for a in tj.get("added_tokens", [])]
    return {**tj, "model": sub_model, "added_tokens": added_tokens}, kept


_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _byte_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the alphabet of byte-level BPE vocabularies)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _write_probe_gguf(path: Path, write: Callable[[Any, str], Any], pre: str) -> int:
    """A vocab-only GGUF (`write(writer, pre)` adds the vocabulary) behind the smallest llama header
    llama.cpp's loader reads before it; returns the number of tokens."""
    import gguf

    w = gguf.GGUFWriter(path, "llama")
    try:
        w.add_context_length(256)
        w.add_embedding_length(8)
        w.add_block_count(1)
        w.add_feed_forward_length(8)
        w.add_head_count(1)
        w.add_layer_norm_rms_eps(1e-5)
        info = write(w, pre)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
    finally:
        w.close()
    return int(info.n_tokens)


def _llama_ids(path: Path, old_ids: list[int] | None) -> list[list[int]] | str:
    """llama.cpp's ids for every probe (mapped back to the full vocabulary), or why it refused the file."""
    from qlocal.llamacpp import llama_reason, load_llama

    try:
        llm = load_llama(path, vocab_only=True)
    except UserError as e:
        return llama_reason() or str(e)  # llama.cpp's words, without the temp file's name
    try:
        out = [llm.tokenize(p.encode("utf-8"), add_bos=False, special=False) for p in PROBES]
    finally:
        llm.close()
    return out if old_ids is None else [[old_ids[i] for i in ids] for ids in out]


def _example(probe: str, hf: list[int], gg: list[int]) -> str:
    at = next((i for i, (a, b) in enumerate(zip(hf, gg)) if a != b), min(len(hf), len(gg)))
    short = probe if len(probe) <= 40 else probe[:37] + "..."
    return f"{short!r}: HF {hf[at:at + 4]} vs llama.cpp {gg[at:at + 4]} from token {at}"
