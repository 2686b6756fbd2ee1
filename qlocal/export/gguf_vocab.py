"""Tokenizer metadata for the GGUF converter, read straight from tokenizer.json (no transformers).

Two shapes cover the supported families:

* byte-level BPE (Qwen, Llama 3, Mistral Nemo/tekken, GPT-2 style): `tokenizer.ggml.model = "gpt2"`,
  tokens as stored in the vocab (`Ġthe`), merges, and a `tokenizer.ggml.pre` naming the
  pre-tokenizer regex llama.cpp must use;
* SentencePiece-style (Gemma, Llama 2, Mistral v0.x): `tokenizer.ggml.model = "llama"` with scores.
  A tokenizer.json BPE with byte_fallback gets scores from merge ranks (llama.cpp's SPM tokenizer
  merges the highest-scoring pair first, so -rank reproduces BPE order); a Unigram model keeps its
  own scores; a lone tokenizer.model is read with sentencepiece via gguf.vocab.

`tokenizer.ggml.pre` is chosen by behaviour in `qlocal.export.pretokenizer` (llama.cpp must
tokenise a probe corpus exactly as the HF tokenizer does); `suggest_pre` here only says which name
the tokenizer.json regex points to, the name tried first.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gguf import GGUFWriter, TokenType

from qlocal.chat_families import detect, end_of_turn_tokens
from qlocal.errors import UserError

QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
TEKKEN_REGEX = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"
                r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# Split regex -> the llama.cpp pre-tokenizer name it suggests (tried first; behaviour decides).
KNOWN_PRE = {QWEN2_REGEX: "qwen2", LLAMA3_REGEX: "llama-bpe", TEKKEN_REGEX: "tekken", GPT2_REGEX: "gpt-2"}
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@dataclass
class VocabInfo:
    """What was written, for reports and tests."""

    model: str                      # "gpt2" or "llama"
    pre: str | None                 # tokenizer.ggml.pre for BPE
    n_tokens: int
    special_ids: dict[str, int] = field(default_factory=dict)
    add_bos: bool = False


def suggest_pre(tokenizer: dict[str, Any]) -> str:
    """The llama.cpp pre-tokenizer name a byte-level BPE tokenizer.json's regex points to.

    Only a first guess: `qlocal.export.pretokenizer` keeps it when llama.cpp then tokenises like HF.
    """
    pre = tokenizer.get("pre_tokenizer")
    patterns = _split_patterns(pre)
    if not patterns:
        # Plain ByteLevel(use_regex=True) splits with GPT-2's regex; StarCoder/SmolLM isolate digits first.
        digits = _find(pre, "Digits")
        return "starcoder" if digits and digits.get("individual_digits") else "gpt-2"
    for p in patterns:
        if p in KNOWN_PRE:
            return KNOWN_PRE[p]
    p = patterns[0]
    if r"\p{N}{1,3}" in p:
        return "llama-bpe"
    if re.search(r"\\p\{N\}(?![+*{])", p):
        return "qwen2"
    return "gpt-2"


def is_sentencepiece_style(tokenizer: dict[str, Any]) -> bool:
    """Whether a tokenizer.json is SentencePiece-style (Unigram, or BPE with byte_fallback or no
    ByteLevel anywhere) rather than GPT-2 byte-level BPE."""
    model = tokenizer.get("model", {})
    if model.get("type") == "Unigram":
        return True
    return bool(model.get("byte_fallback")) or (_find(tokenizer.get("pre_tokenizer"), "ByteLevel") is None
                                                and _find(tokenizer.get("decoder"), "ByteLevel") is None)


def _split_patterns(pre: dict[str, Any] | None) -> list[str]:
    if not pre:
        return []
    if pre.get("type") == "Sequence":
        return [p for sub in pre.get("pretokenizers", []) for p in _split_patterns(sub)]
    if pre.get("type") == "Split":
        pat = pre.get("pattern", {})
        return [pat.get("Regex") or re.escape(pat.get("String", ""))]
    return []


def _find(node: dict[str, Any] | None, typ: str) -> dict[str, Any] | None:
    """First component of type `typ` in a (possibly nested Sequence) tokenizer.json component."""
    if not node:
        return None
    if node.get("type") == typ:
        return node
    for key in ("pretokenizers", "normalizers", "decoders", "processors"):
        for sub in node.get(key, []) or []:
            if found := _find(sub, typ):
                return found
    return None


def _token_str(entry: Any) -> str | None:
    if isinstance(entry, str):
        return entry
    if isinstance(entry, dict) and isinstance(entry.get("content"), str):
        return entry["content"]
    return None


def load_chat_template(hf_dir: Path, tok_config: dict[str, Any]) -> str | None:
    """The tokenizer's own chat template: tokenizer_config.json, else chat_template.jinja/.json."""
    tmpl = tok_config.get("chat_template")
    if isinstance(tmpl, list):  # named templates: keep the default one
        tmpl = next((t["template"] for t in tmpl if t.get("name") == "default"), None)
    if isinstance(tmpl, str):
        return tmpl
    if (hf_dir / "chat_template.jinja").is_file():
        return (hf_dir / "chat_template.jinja").read_text(encoding="utf-8")
    if (hf_dir / "chat_template.json").is_file():
        return json.loads((hf_dir / "chat_template.json").read_text(encoding="utf-8")).get("chat_template")
    return None


def write_vocab(w: GGUFWriter, hf_dir: Path, n_vocab: int | None, chat_template: str | None = None,
                pre: str | None = None) -> VocabInfo:
    """Add tokenizer metadata for the HF folder `hf_dir` to `w`; `n_vocab` pads to the embedding rows.

    `pre` is the byte-level BPE pre-tokenizer name (convert_hf_to_gguf passes the one chosen by
    behaviour); None writes `suggest_pre`'s, unchecked. SentencePiece-style vocabs always get "default".
    """
    tok_config = read_json(hf_dir / "tokenizer_config.json")
    config = read_json(hf_dir / "config.json")
    tj_path = hf_dir / "tokenizer.json"
    template = chat_template or load_chat_template(hf_dir, tok_config)
    if tj_path.is_file():
        info = write_tokenizer_json(w, json.loads(tj_path.read_text(encoding="utf-8")), tok_config, config,
                                    n_vocab, pre, template)
    elif (hf_dir / "tokenizer.model").is_file():
        info, lookup = _write_tokens_sentencepiece(w, hf_dir, n_vocab)
        _write_specials(w, info, {}, tok_config, config, lookup, template)
    else:
        raise UserError(f"{hf_dir}: no tokenizer.json or tokenizer.model; the GGUF needs the tokenizer")
    if template:
        w.add_chat_template(template)
    return info


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file's object, or {} when the file is absent."""
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def write_tokenizer_json(w: GGUFWriter, tj: dict[str, Any], tok_config: dict[str, Any], config: dict[str, Any],
                         n_vocab: int | None, pre: str | None = None, template: str | None = None) -> VocabInfo:
    """Tokens, merges or scores, and special-token metadata of a parsed tokenizer.json (no chat template).

    May drop `tj["model"]["merges"]` to save memory; pass a copy to keep it.
    """
    info, lookup = _write_tokens_json(w, tj, tok_config, n_vocab, pre)
    _write_specials(w, info, tj, tok_config, config, lookup, template)
    return info


def _write_tokens_json(w: GGUFWriter, tj: dict[str, Any], tok_config: dict[str, Any],
                       n_vocab: int | None, pre: str | None) -> tuple[VocabInfo, dict[str, int]]:
    model = tj.get("model", {})
    kind = model.get("type")
    added = {a["id"]: a for a in tj.get("added_tokens", [])}
    spm = is_sentencepiece_style(tj)
    if kind == "Unigram":
        pieces = {i: (p, float(s)) for i, (p, s) in enumerate(model["vocab"])}
    elif kind == "BPE":
        vocab: dict[str, int] = model["vocab"]
        rank: dict[str, int] = {}
        n_merges = len(model.get("merges") or [])
        if spm:
            # Merges are only needed for their ranks here; drop the (large) parsed list as we go.
            for r, m in enumerate(model.pop("merges", None) or []):
                rank.setdefault(m.replace(" ", "") if isinstance(m, str) else "".join(m), r)
        # SPM scores: -rank for merge results (llama.cpp merges highest score first = BPE order);
        # everything else ranks after every merge so it never wins a tie against one.
        pieces = {i: (t, -float(rank.get(t, n_merges + i))) for t, i in vocab.items()}
        del rank
    else:
        raise UserError(f"tokenizer.json model type {kind!r} is not supported by the GGUF export "
                        "(supported: byte-level BPE, SentencePiece-style BPE/Unigram)")

    n = max([n_vocab or 0, *(i + 1 for i in pieces), *(i + 1 for i in added)])
    unk = _token_str(tok_config.get("unk_token")) or model.get("unk_token")
    tokens: list[str] = []
    scores: list[float] = []
    types: list[int] = []
    for i in range(n):
        if i in added:
            text = added[i]["content"]
            special = bool(added[i].get("special"))
            ttype = TokenType.CONTROL if special else TokenType.USER_DEFINED
            if spm and not special:
                text = text.replace("\u2581", " ")  # llama.cpp matches user-defined tokens on raw text
            score = 0.0
        elif i in pieces:
            text, score = pieces[i]
            ttype = TokenType.NORMAL
            if spm and _BYTE_TOKEN.fullmatch(text):
                ttype = TokenType.BYTE
        else:  # config vocab_size larger than the tokenizer (Qwen pads its embeddings)
            text, score, ttype = f"[PAD{i}]", -1000.0, TokenType.UNUSED
        if text == unk and spm:
            ttype = TokenType.UNKNOWN
        tokens.append(text)
        scores.append(score)
        types.append(int(ttype))

    lookup = _first_ids(tokens)
    if spm:
        info = _add_spm(w, tokens, scores, types, _spm_space_prefix(tj))
    else:
        pre = pre or suggest_pre(tj)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
        # gguf-py's convention for merges whose parts contain a space (list format only).
        w.add_token_merges([m if isinstance(m, str) else " ".join(p.replace(" ", "\u0120") for p in m)
                            for m in model.get("merges") or []])
        info = VocabInfo("gpt2", pre, n)
    return info, lookup


def _spm_space_prefix(tj: dict[str, Any]) -> bool:
    """Whether text gets a leading ▁ (Llama 2/Mistral yes, Gemma no)."""
    meta = _find(tj.get("pre_tokenizer"), "Metaspace")
    if meta is not None:
        return meta.get("prepend_scheme", "always" if meta.get("add_prefix_space", True) else "never") != "never"
    prepend = _find(tj.get("normalizer"), "Prepend")
    return bool(prepend and prepend.get("prepend") == "\u2581")


def _write_tokens_sentencepiece(w: GGUFWriter, hf_dir: Path,
                                n_vocab: int | None) -> tuple[VocabInfo, dict[str, int]]:
    from gguf.vocab import SentencePieceVocab

    try:
        vocab = SentencePieceVocab(hf_dir)
    except ImportError as e:  # sentencepiece is optional
        raise UserError(f"{hf_dir}: only tokenizer.model found; pip install sentencepiece") from e
    tokens, scores, types = [], [], []
    for text, score, ttype in vocab.all_tokens():
        tokens.append(text.decode("utf-8"))
        scores.append(score)
        types.append(int(ttype))
    for i in range(len(tokens), n_vocab or 0):
        tokens.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(int(TokenType.UNUSED))
    space_prefix = (bool(vocab.sentencepiece_tokenizer.get_add_dummy_prefix())
                    if hasattr(vocab.sentencepiece_tokenizer, "get_add_dummy_prefix") else True)
    return _add_spm(w, tokens, scores, types, space_prefix), _first_ids(tokens)


def _add_spm(w: GGUFWriter, tokens: list[str], scores: list[float], types: list[int], space_prefix: bool) -> VocabInfo:
    """The GGUF keys of a SentencePiece-style vocabulary (llama.cpp's "llama" tokenizer model)."""
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_add_space_prefix(space_prefix)
    return VocabInfo("llama", None, len(tokens))


def _first_ids(tokens: list[str]) -> dict[str, int]:
    """Token text -> the first id that has it (the specials' ids are looked up by text)."""
    return {t: i for i, t in reversed(list(enumerate(tokens)))}


def _write_specials(w: GGUFWriter, info: VocabInfo, tj: dict[str, Any], tok_config: dict[str, Any],
                    config: dict[str, Any], lookup: dict[str, int], template: str | None = None) -> None:
    ids: dict[str, int] = {}
    for typ in ("bos", "eos", "unk", "pad"):
        text = _token_str(tok_config.get(f"{typ}_token"))
        if text is not None and text in lookup:
            ids[typ] = lookup[text]
            continue
        cid = config.get(f"{typ}_token_id", (config.get("text_config") or {}).get(f"{typ}_token_id"))
        if isinstance(cid, list):
            cid = cid[0] if cid else None
        if isinstance(cid, int) and 0 <= cid < info.n_tokens:
            ids[typ] = cid
    # The token that ends a chat turn is written as eot, so llama.cpp stops there even when eos differs.
    # The template's own family first: a vocabulary can hold several (ChatML added to a Llama 3 base).
    family = detect(template) if template else None
    eot = next((lookup[t] for t in (*(family.end_of_turn if family else ()), *end_of_turn_tokens())
                if t in lookup), None)
    if eot is not None:
        ids["eot"] = eot
    for typ, tid in ids.items():
        getattr(w, f"add_{typ}_token_id")(tid)
    info.special_ids.update(ids)

    # add_bos/add_eos: tokenizer_config wins, else what the post-processor template adds.
    tmpl = _find(tj.get("post_processor"), "TemplateProcessing")
    single = (tmpl or {}).get("single", [])
    first = single[0].get("SpecialToken", {}).get("id") if single else None
    last = single[-1].get("SpecialToken", {}).get("id") if single else None
    bos_text = _token_str(tok_config.get("bos_token"))
    eos_text = _token_str(tok_config.get("eos_token"))
    add_bos = tok_config.get("add_bos_token")
    if not isinstance(add_bos, bool):
        add_bos = first is not None and (first == bos_text or lookup.get(first) == ids.get("bos"))
    add_eos = tok_config.get("add_eos_token")
    if not isinstance(add_eos, bool):
        add_eos = last is not None and len(single) > 1 and last == eos_text
    w.add_add_bos_token(bool(add_bos))
    w.add_add_eos_token(bool(add_eos))
    info.add_bos = bool(add_bos)
