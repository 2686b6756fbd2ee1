"""The GGUF pre-tokenizer is chosen by behaviour: llama.cpp must tokenise the probe corpus as HF does.

Tokenizers of every shape the export meets are trained here with the `tokenizers` library (no
network): byte-level BPE with plain ByteLevel, the GPT-2, Llama 3, Qwen 2 and tekken Split regexes,
digit splitting, and SentencePiece ones (a Llama-2-style tokenizer.json and a sentencepiece
tokenizer.model). For each, the converted GGUF loads in llama.cpp and tokenises the probes exactly
as HF does; the plain ByteLevel one (which used to get llama.cpp's unknown "gpt2") goes through
`qlocal export` end to end. A tokenizer no llama.cpp pre-tokenizer reproduces stops the export in
one line unless --allow-tokenizer-mismatch, and a GGUF llama.cpp refuses is one line, not a traceback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest

pytest.importorskip("gguf")
pytest.importorskip("llama_cpp")
pytest.importorskip("tokenizers")
pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers  # noqa: E402

from conftest import run_qlocal  # noqa: E402
from qlocal.export.gguf_vocab import GPT2_REGEX, LLAMA3_REGEX, QWEN2_REGEX, TEKKEN_REGEX  # noqa: E402
from qlocal.export.pretokenizer import CANDIDATES, PROBES, PreTokenizerCheck, check_pretokenizer  # noqa: E402

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
BYTE_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SPM_SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CUSTOM_REGEX = r"\p{L}{1,3}|\p{N}{1,2}|\s|[^\s\p{L}\p{N}]+"  # no llama.cpp pre-tokenizer splits like this


def _text() -> list[str]:
    from assets.make_tokenizers import corpus

    # The probes themselves are in the training text, so their words become tokens and a wrong
    # split shows up as different ids rather than hiding in byte-sized pieces.
    return corpus() + list(PROBES) * 2


def _byte_level(pre: Any, ignore_merges: bool = False, normalizer: Any = None,
                specials: list[str] = BYTE_SPECIALS) -> Tokenizer:
    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_text(), trainer=trainer)
    return tok


def _split(regex: str) -> Any:
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _spm_llama2() -> Tokenizer:
    """Llama-2-style tokenizer.json: ▁ for spaces (prepended), byte-fallback BPE, no pre-tokenizer."""
    norm = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_tok.normalizer = norm
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer_tok.train_from_iterator(_text(), trainers.BpeTrainer(
        vocab_size=1200, special_tokens=SPM_SPECIALS + byte_tokens, show_progress=False, max_token_length=16))
    # Rebuild with byte_fallback (the trainer cannot add <0xNN> pieces itself), as make_tokenizers does.
    state = json.loads(trainer_tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in state["merges"]]
    tok = Tokenizer(models.BPE(vocab=state["vocab"], merges=merges, unk_token="<unk>", byte_fallback=True,
                               fuse_unk=True))
    tok.add_special_tokens(SPM_SPECIALS)
    tok.normalizer = norm
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return tok


KINDS: dict[str, Callable[[], Tokenizer]] = {
    "bytelevel": lambda: _byte_level(pre_tokenizers.ByteLevel(add_prefix_space=False)),
    "gpt2": lambda: _byte_level(_split(GPT2_REGEX)),
    "llama3": lambda: _byte_level(_split(LLAMA3_REGEX), ignore_merges=True),
    "qwen2": lambda: _byte_level(_split(QWEN2_REGEX), normalizer=normalizers.NFC()),
    "tekken": lambda: _byte_level(_split(TEKKEN_REGEX), ignore_merges=True),
    "digits": lambda: _byte_level(pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                          pre_tokenizers.ByteLevel(add_prefix_space=False)])),
    "spm": _spm_llama2,
    "custom": lambda: _byte_level(_split(CUSTOM_REGEX)),
}
EXPECTED_PRE = {"bytelevel": "gpt-2", "gpt2": "gpt-2", "llama3": "llama-bpe", "qwen2": "qwen2", "tekken": "tekken",
                "digits": "starcoder", "spm": "default"}


def _save_model(tok: Tokenizer, out: Path, spm: bool) -> Path:
    """A tiny random Llama around `tok`, saved as a complete HF folder (ChatML template)."""
    import transformers as tf

    extra = {"bos_token": "<s>", "unk_token": "<unk>"} if spm else {"pad_token": "<|endoftext|>"}
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", chat_template=CHATML, **extra)
    config = tf.LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                            eos_token_id=fast.eos_token_id, bos_token_id=fast.bos_token_id,
                            pad_token_id=fast.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out)
    fast.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Factory: model_dir(kind) -> a tiny Llama HF folder with that kind of tokenizer (cached)."""
    root = tmp_path_factory.mktemp("pretok")
    cache: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in cache:
            cache[kind] = _save_model(KINDS[kind](), root / kind, kind == "spm")
        return cache[kind]

    return get


def _hf_ids(hf_dir: Path) -> list[list[int]]:
    tok = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    return [tok.encode(p, add_special_tokens=False).ids for p in PROBES]


def _gguf_ids(path: Path, **kw: Any) -> list[list[int]]:
    from qlocal.llamacpp import load_llama

    llm = load_llama(path, n_ctx=64, **kw)
    try:
        return [llm.tokenize(p.encode("utf-8"), add_bos=False, special=False) for p in PROBES]
    finally:
        llm.close()


def _pre(path: Path) -> str:
    from gguf import GGUFReader

    return GGUFReader(path).fields["tokenizer.ggml.pre"].contents()


# ---------------------------------------------------------------- every tokenizer shape

@pytest.mark.parametrize("kind", list(EXPECTED_PRE))
def test_converted_gguf_tokenises_probes_like_hf(kind: str, model_dir: Any, tmp_path: Path) -> None:
    from qlocal.export import convert_hf_to_gguf

    hf_dir = model_dir(kind)
    check = check_pretokenizer(hf_dir)
    # The regex's suggestion is tried first and kept: one vocab-only load.
    assert check.matched and check.pre == check.suggested == EXPECTED_PRE[kind], check.line()
    assert list(check.tried) == [check.pre] and check.differ == 0
    path = convert_hf_to_gguf(hf_dir, tmp_path / "m.gguf")
    assert _pre(path) == EXPECTED_PRE[kind]
    assert _gguf_ids(path) == _hf_ids(hf_dir)  # the whole model file, not the probe vocabulary


def test_sentencepiece_model_file(tmp_path: Path) -> None:
    """A folder with only tokenizer.model (sentencepiece BPE, as Llama/Gemma ship it) passes the same check."""
    spm = pytest.importorskip("sentencepiece")
    import transformers as tf

    from qlocal.export import convert_hf_to_gguf

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_text()), model_prefix=str(tmp_path / "tokenizer"), vocab_size=600, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    (tmp_path / "tokenizer.vocab").unlink()
    config = tf.LlamaConfig(vocab_size=600, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                            num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2)
    tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(tmp_path)
    check = check_pretokenizer(tmp_path)
    assert check.matched and check.pre == "default" and list(check.tried) == ["default"], check.line()
    path = convert_hf_to_gguf(tmp_path, tmp_path / "m.gguf")
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    assert _gguf_ids(path) == [sp.encode(p) for p in PROBES]


@pytest.mark.parametrize("kind", ["qwen2", "spm"])
def test_probe_vocabulary_tokenises_like_the_whole_one(kind: str, model_dir: Any, tmp_path: Path) -> None:
    """The speed-up's premise: with only the probe-reachable tokens, every candidate gives the same ids."""
    from qlocal.export import pretokenizer as pt
    from qlocal.export.gguf_vocab import is_sentencepiece_style, write_tokenizer_json, write_vocab

    hf_dir = model_dir(kind)
    tj = json.loads((hf_dir / "tokenizer.json").read_text())
    spm = is_sentencepiece_style(tj)
    sub, old_ids = pt.probe_vocabulary(tj, spm)
    assert len(old_ids) < len(tj["model"]["vocab"])
    for name in ["default"] if spm else CANDIDATES:
        pt._write_probe_gguf(tmp_path / "full.gguf", lambda w, pre: write_vocab(w, hf_dir, None, pre=pre), name)
        pt._write_probe_gguf(tmp_path / "sub.gguf", lambda w, pre: write_tokenizer_json(
            w, {**sub, "model": dict(sub["model"])}, {}, {}, None, pre), name)
        full = pt._llama_ids(tmp_path / "full.gguf", None)
        assert isinstance(full, list), f"{name}: {full}"
        assert pt._llama_ids(tmp_path / "sub.gguf", old_ids) == full, name


# ---------------------------------------------------------------- qlocal export

def test_plain_bytelevel_exports_end_to_end(model_dir: Any, tmp_path: Path) -> None:
    """The tokenizer that used to export pre="gpt2" (refused by llama.cpp, then a traceback) exports and verifies."""
    from export_helpers import make_run

    run = make_run(model_dir("bytelevel"), tmp_path / "run")
    out = tmp_path / "export"
    r = run_qlocal("export", run, "--quant", "f16", "--out", out)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "pre-tokenizer 'gpt-2' tokenises all" in r.stdout
    summary = json.loads((out / "export.json").read_text())
    assert summary["tokenizer"]["pre"] == "gpt-2" and summary["tokenizer"]["matched"]
    verify = json.loads((out / "verify.json").read_text())
    assert verify["passed"] and verify["pretokenizer"]["pre"] == "gpt-2"
    assert verify["files"][0]["tokenizer_match"]
    assert _pre(out / "model-f16.gguf") == "gpt-2"
    assert _gguf_ids(out / "model-f16.gguf") == _hf_ids(out / "fused")


def test_unreproducible_tokenizer_stops_unless_allowed(model_dir: Any, tmp_path: Path) -> None:
    from export_helpers import make_run

    run = make_run(model_dir("custom"), tmp_path / "run")
    out = tmp_path / "export"
    r = run_qlocal("export", run, "--quant", "f16", "--out", out)
    assert r.returncode == 2, r.stdout + r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "probes differ with the closest" in r.stderr and "--allow-tokenizer-mismatch" in r.stderr
    assert not out.exists() and not list(tmp_path.glob(".export*"))

    r = run_qlocal("export", run, "--quant", "f16", "--out", out, "--allow-tokenizer-mismatch")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "warning: tokenizer: no llama.cpp pre-tokenizer tokenises like HF" in r.stdout
    pre = json.loads((out / "export.json").read_text())["tokenizer"]
    assert not pre["matched"] and pre["allowed_mismatch"] and pre["differ"] > 0 and pre["example"]
    # Every candidate was tried, and the installed llama.cpp knows every name in the list.
    assert set(pre["tried"]) == set(CANDIDATES) and all(isinstance(v, int) for v in pre["tried"].values())
    assert pre["differ"] == min(pre["tried"].values()) and _pre(out / "model-f16.gguf") == pre["pre"]
    verify = json.loads((out / "verify.json").read_text())
    assert verify["passed"] and not verify["files"][0]["tokenizer_match"]  # reported, allowed


def test_gguf_llama_cpp_refuses_is_one_line(model_dir: Any, tmp_path: Path) -> None:
    """What the old name table wrote (pre="gpt2"): generate and verify say llama.cpp's reason in one line."""
    from qlocal.errors import UserError
    from qlocal.export import convert_hf_to_gguf
    from qlocal.export.verify import load_llama

    old = PreTokenizerCheck("gpt2", "gpt2", True, len(PROBES), 0, None)
    bad = convert_hf_to_gguf(model_dir("bytelevel"), tmp_path / "bad.gguf", pretokenizer=old)
    r = run_qlocal("generate", bad, "--prompt", "hi")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines() == [f"error: {bad}: llama.cpp cannot load this GGUF: "
                                             "error loading model vocabulary: unknown pre-tokenizer type: 'gpt2'"]
    with pytest.raises(UserError, match="unknown pre-tokenizer type: 'gpt2'"):
        load_llama(bad)
