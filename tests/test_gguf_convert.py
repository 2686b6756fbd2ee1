"""GGUF converter: every supported family, converted from a tiny random HF model, loaded by llama.cpp.

For each family: llama.cpp's tokenisation of a probe set equals the HF tokenizer's, logits match the
HF model (normalised MSE < 1e-3) and greedy continuations agree. Plus metadata, streaming, the
unknown-pre-tokenizer choice and the unsupported-architecture error.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("gguf")
pytest.importorskip("llama_cpp")
pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from conftest import EXPORT_ARCHS  # noqa: E402

from qlocal.errors import UserError  # noqa: E402
from qlocal.export.gguf import convert_hf_to_gguf  # noqa: E402

PLAIN_PROBES = [
    "Hello world! The cat reads 12345 books.",
    "你好，世界。机器学习",
    "  indented\n\n\tcode();  x = {'a': [1, 2]}\n",
    "It's 3.14159 -- don't! https://example.com/path?q=1",
    "émoji 🙂 and ünïcödé",
    " leading space, trailing space ",
]
PROMPT = "The quick brown fox jumps over the lazy dog. Paris is the capital of France, and"
NMSE_MAX = 1e-3


def nmse(a: np.ndarray, b: np.ndarray) -> float:
    """Normalised MSE of a against reference b."""
    return float(((a - b) ** 2).mean() / (b ** 2).mean())


def load_gguf(path: Path, **kw: Any) -> Any:
    from llama_cpp import Llama

    return Llama(model_path=str(path), logits_all=True, n_ctx=512, n_threads=2, verbose=False, **kw)


def gguf_logits(llm: Any, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def hf_model(model_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def probes(tok: Any) -> list[str]:
    """Plain strings plus the tokenizer's own chat template output (so its special tokens appear)."""
    chat = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]
    return PLAIN_PROBES + [tok.apply_chat_template(chat, tokenize=False)]


def greedy(step: Any, ids: list[int], n: int) -> list[int]:
    out = list(ids)
    for _ in range(n):
        out.append(int(np.argmax(step(out))))
    return out[len(ids):]


def read_fields(path: Path) -> dict[str, Any]:
    """GGUF key/values (scalars, strings and arrays decoded) and tensor names, via gguf's reader."""
    from gguf import GGUFReader

    r = GGUFReader(path)
    fields = {k: f.contents() for k, f in r.fields.items()}
    fields["_tensors"] = {t.name: t for t in r.tensors}
    return fields


@pytest.fixture(scope="module")
def converted(tiny_model_dir: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Factory: converted(arch, outtype) -> (hf_dir, gguf_path), cached per module."""
    root = tmp_path_factory.mktemp("gguf")
    cache: dict[tuple[str, str], tuple[Path, Path]] = {}

    def get(arch: str, outtype: str = "f16") -> tuple[Path, Path]:
        if (arch, outtype) not in cache:
            hf_dir = tiny_model_dir(arch)
            cache[arch, outtype] = hf_dir, convert_hf_to_gguf(hf_dir, root / f"{arch}-{outtype}.gguf", outtype)
        return cache[arch, outtype]

    return get


# ---------------------------------------------------------------- every family, end to end

@pytest.mark.parametrize("arch", EXPORT_ARCHS)
def test_family_matches_hf(arch: str, converted: Any) -> None:
    from transformers import AutoTokenizer

    hf_dir, path = converted(arch)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    llm = load_gguf(path)
    for text in probes(tok):
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == tok(text)["input_ids"], text

    model = hf_model(hf_dir)
    ids = tok(PROMPT)["input_ids"]
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    assert nmse(gguf_logits(llm, ids), ref) < NMSE_MAX

    def hf_step(seq: list[int]) -> np.ndarray:
        with torch.no_grad():
            return model(torch.tensor([seq])).logits[0, -1].numpy()

    assert greedy(lambda s: gguf_logits(llm, s)[-1], ids, 6) == greedy(hf_step, ids, 6)
    llm.close()


def test_q8_0_matches_hf(converted: Any) -> None:
    from transformers import AutoTokenizer

    hf_dir, path = converted("qwen2", "q8_0")
    _, f16 = converted("qwen2", "f16")
    assert path.stat().st_size < f16.stat().st_size
    fields = read_fields(path)
    assert fields["_tensors"]["blk.0.attn_q.weight"].tensor_type.name == "Q8_0"
    assert fields["_tensors"]["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    tok = AutoTokenizer.from_pretrained(hf_dir)
    ids = tok(PROMPT)["input_ids"]
    with torch.no_grad():
        ref = hf_model(hf_dir)(torch.tensor([ids])).logits[0].numpy()
    llm = load_gguf(path)
    assert nmse(gguf_logits(llm, ids), ref) < NMSE_MAX
    llm.close()


@pytest.mark.parametrize("outtype", ["f32", "bf16"])
def test_other_outtypes_load(outtype: str, converted: Any) -> None:
    hf_dir, path = converted("gemma3", outtype)
    fields = read_fields(path)
    assert fields["_tensors"]["blk.0.attn_q.weight"].tensor_type.name == outtype.upper()
    llm = load_gguf(path)
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(hf_dir)(PROMPT)["input_ids"]
    with torch.no_grad():
        ref = hf_model(hf_dir)(torch.tensor([ids])).logits[0].numpy()
    assert nmse(gguf_logits(llm, ids), ref) < NMSE_MAX
    llm.close()


# ---------------------------------------------------------------- metadata

@pytest.mark.parametrize("arch,gguf_arch,pre,model", [
    ("qwen2", "qwen2", "qwen2", "gpt2"), ("qwen3", "qwen3", "qwen2", "gpt2"),
    ("llama", "llama", "llama-bpe", "gpt2"), ("mistral", "llama", "default", "llama"),
    ("gemma2", "gemma2", "default", "llama"), ("gemma3", "gemma3", "default", "llama"),
    ("granite", "granite", "qwen2", "gpt2"), ("phi3", "phi3", "llama-bpe", "gpt2"),
    ("smollm3", "smollm3", "llama-bpe", "gpt2"), ("olmo2", "olmo2", "llama-bpe", "gpt2"),
    ("mistral_nemo", "llama", "tekken", "gpt2"), ("qwen3moe", "qwen3moe", "qwen2", "gpt2"),
])
def test_metadata(arch: str, gguf_arch: str, pre: str, model: str, converted: Any) -> None:
    hf_dir, path = converted(arch)
    f = read_fields(path)
    config = json.loads((hf_dir / "config.json").read_text())
    assert f["general.architecture"] == gguf_arch
    assert f["tokenizer.ggml.model"] == model and f["tokenizer.ggml.pre"] == pre
    # Tied embeddings: no output.weight (llama.cpp reuses token_embd); untied: present.
    assert ("output.weight" in f["_tensors"]) == (not config["tie_word_embeddings"])
    assert f["tokenizer.chat_template"] == (hf_dir / "chat_template.jinja").read_text()
    assert "rope_freqs.weight" not in f["_tensors"]


def test_granite_and_phi3_headers(converted: Any) -> None:
    """Granite's four multipliers; Phi-3's fused tensors, partial rotary and LongRoPE factors."""
    hf_dir, path = converted("granite")
    f, cfg = read_fields(path), json.loads((hf_dir / "config.json").read_text())
    for key, hf_key in [("attention.scale", "attention_multiplier"), ("embedding_scale", "embedding_multiplier"),
                        ("residual_scale", "residual_multiplier"), ("logit_scale", "logits_scaling")]:
        assert f[f"granite.{key}"] == pytest.approx(cfg[hf_key])
    hf_dir, path = converted("phi3")
    f, cfg = read_fields(path), json.loads((hf_dir / "config.json").read_text())
    t = f["_tensors"]
    assert "blk.0.attn_qkv.weight" in t and "blk.0.attn_q.weight" not in t
    assert list(t["blk.0.ffn_up.weight"].shape) == [64, 2 * 128]  # gate and up, fused as in HF
    assert f["phi3.rope.dimension_count"] == 12  # 0.75 of head_dim 16
    assert f["phi3.rope.scaling.original_context_length"] == 1024
    assert f["phi3.rope.scaling.attn_factor"] == pytest.approx((1 + np.log(4) / np.log(1024)) ** 0.5)
    rp = cfg["rope_parameters"]
    for kind in ("short", "long"):
        assert t[f"rope_factors_{kind}.weight"].tensor_type.name == "F32"
        assert list(t[f"rope_factors_{kind}.weight"].data) == pytest.approx(rp[f"{kind}_factor"])
    # The folder is named "phi3": general.name must not switch on llama.cpp's name-keyed RSTRIP quirk.
    assert "phi3" not in f["general.name"].lower() and "phi-3" not in f["general.name"].lower()


def test_smollm3_olmo2_nemo_headers(converted: Any, tmp_path: Path) -> None:
    """SmolLM3's NoPE layers matter and only llama.cpp's pattern exports; OLMo 2's norms; Nemo's head_dim."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_dir, path = converted("smollm3")
    f = read_fields(path)
    assert f["smollm3.rope.dimension_count"] == 16 and f["smollm3.block_count"] == 4
    # Control: the fixture's fourth layer has no RoPE, and giving it RoPE moves the logits past NMSE_MAX,
    # so test_family_matches_hf can only pass if llama.cpp skips it too.
    model = hf_model(hf_dir)
    assert model.config.no_rope_layers == [1, 1, 1, 0]
    ids = torch.tensor([AutoTokenizer.from_pretrained(hf_dir)(PROMPT)["input_ids"]])
    with torch.no_grad():
        ref = model(ids).logits[0].numpy()
        model.model.layers[3].self_attn.use_rope = 1
        assert nmse(model(ids).logits[0].numpy(), ref) > 10 * NMSE_MAX
    odd = tmp_path / "smollm3-odd"
    shutil.copytree(hf_dir, odd)
    cfg = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**cfg, "no_rope_layers": [1, 0, 1, 0]}))
    with pytest.raises(UserError, match="no_rope_layers .* every 4th layer"):
        convert_hf_to_gguf(odd, tmp_path / "odd.gguf")
    assert not (tmp_path / "odd.gguf").exists()

    hf_dir, path = converted("olmo2")
    t = read_fields(path)["_tensors"]
    for name in ("post_attention_norm", "post_ffw_norm", "attn_q_norm", "attn_k_norm"):
        assert f"blk.0.{name}.weight" in t, name
    assert "blk.0.attn_norm.weight" not in t and "blk.0.ffn_norm.weight" not in t  # no pre-norms in OLMo 2
    assert list(t["blk.0.attn_q_norm.weight"].shape) == [64] and list(t["blk.0.attn_k_norm.weight"].shape) == [32]
    # Not permuted: the q norm is HF's vector as it is (the fixture's norms are random, not ones).
    hf_q_norm = AutoModelForCausalLM.from_pretrained(hf_dir).model.layers[0].self_attn.q_norm.weight.detach().numpy()
    np.testing.assert_array_equal(np.asarray(t["blk.0.attn_q_norm.weight"].data), hf_q_norm)

    hf_dir, path = converted("mistral_nemo")
    f = read_fields(path)
    assert f["llama.attention.key_length"] == f["llama.attention.value_length"] == 32
    assert f["llama.rope.dimension_count"] == 32 and f["llama.embedding_length"] == 64
    assert list(f["_tensors"]["blk.0.attn_q.weight"].shape) == [64, 4 * 32]


def test_special_tokens_and_merges(converted: Any) -> None:
    """Byte-level BPE: vocab order, merges, control types, bos/eos/eot/pad and add_bos, vs tokenizer.json."""
    from gguf import TokenType

    for arch, eos, eot, bos, add_bos in [("qwen2", "<|im_end|>", "<|im_end|>", None, False),
                                         ("llama", "<|eot_id|>", "<|eot_id|>", "<|begin_of_text|>", True)]:
        hf_dir, path = converted(arch)
        tj = json.loads((hf_dir / "tokenizer.json").read_text())
        f = read_fields(path)
        tokens = f["tokenizer.ggml.tokens"]
        vocab = {**tj["model"]["vocab"], **{a["content"]: a["id"] for a in tj["added_tokens"]}}
        assert tokens == sorted(vocab, key=vocab.get)
        merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
        assert f["tokenizer.ggml.merges"] == merges
        types = f["tokenizer.ggml.token_type"]
        for a in tj["added_tokens"]:
            assert types[a["id"]] == (TokenType.CONTROL if a["special"] else TokenType.USER_DEFINED)
        assert types[vocab["a"]] == TokenType.NORMAL
        assert tokens[f["tokenizer.ggml.eos_token_id"]] == eos
        assert tokens[f["tokenizer.ggml.eot_token_id"]] == eot
        assert (tokens[f["tokenizer.ggml.bos_token_id"]] if bos else None) == bos or bos is None
        assert f["tokenizer.ggml.add_bos_token"] is add_bos
        assert f["tokenizer.ggml.padding_token_id"] == vocab[json.loads(
            (hf_dir / "tokenizer_config.json").read_text())["pad_token"]]


def test_sentencepiece_vocab(converted: Any) -> None:
    """Gemma-style vocab: byte tokens typed BYTE, specials CONTROL, unk UNKNOWN, no space prefix, bos added."""
    from gguf import TokenType

    _, path = converted("gemma3")
    f = read_fields(path)
    tokens, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
    assert types[tokens.index("<0x41>")] == TokenType.BYTE
    assert types[tokens.index("<start_of_turn>")] == TokenType.CONTROL
    assert types[tokens.index("<unk>")] == TokenType.UNKNOWN
    assert f["tokenizer.ggml.add_space_prefix"] is False and f["tokenizer.ggml.add_bos_token"] is True
    assert tokens[f["tokenizer.ggml.eot_token_id"]] == "<end_of_turn>"
    assert len(f["tokenizer.ggml.scores"]) == len(tokens)


def test_llama3_rope_freqs_match_transformers(converted: Any) -> None:
    """rope_freqs divides each base frequency exactly as transformers' llama3 rope does."""
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_dir, path = converted("llama31")
    config = AutoConfig.from_pretrained(hf_dir)
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    f = read_fields(path)
    factors = np.asarray(f["_tensors"]["rope_freqs.weight"].data, dtype=np.float64)
    dim = config.head_dim
    base = 1.0 / (config.rope_parameters["rope_theta"] ** (np.arange(0, dim, 2) / dim))
    np.testing.assert_allclose(base / factors, inv_freq.double().numpy(), rtol=1e-5)
    assert len(set(np.round(factors, 4))) > 2  # this tiny config reaches all three regimes


def test_chat_template_and_name_override(tiny_model_dir: Any, tmp_path: Path) -> None:
    out = convert_hf_to_gguf(tiny_model_dir("qwen2"), tmp_path / "m.gguf", chat_template="{{ 'X' }}", name="my-run")
    f = read_fields(out)
    assert f["tokenizer.chat_template"] == "{{ 'X' }}" and f["general.name"] == "my-run"
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]  # no temp file left behind


# ---------------------------------------------------------------- streaming

def test_row_chunks_write_identical_file(tiny_model_dir: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny chunks (a few rows at a time) give byte-identical output, so big tensors stream safely."""
    import qlocal.export.gguf as g

    hf_dir = tiny_model_dir("gemma3")
    whole = convert_hf_to_gguf(hf_dir, tmp_path / "whole.gguf", "q8_0")
    monkeypatch.setattr(g, "CHUNK_BYTES", 1000)
    chunked = convert_hf_to_gguf(hf_dir, tmp_path / "chunked.gguf", "q8_0")
    assert whole.read_bytes() == chunked.read_bytes()


def test_bf16_safetensors_read_exactly(tiny_model_dir: Any, tmp_path: Path) -> None:
    """bf16 checkpoints (most real ones) are widened without torch, bit-exactly."""
    from safetensors.numpy import load_file
    from safetensors.torch import save_file

    from qlocal.export.gguf import index_safetensors

    src = tiny_model_dir("llama") / "model.safetensors"
    t = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in load_file(src).items()}
    save_file(t, str(tmp_path / "model.safetensors"))
    st = index_safetensors(tmp_path)
    for k, v in t.items():
        np.testing.assert_array_equal(st[k].read(), v.float().numpy())


# ---------------------------------------------------------------- choices and errors

def test_unknown_bpe_pre_tokenizer_falls_back(tiny_model_dir: Any, tmp_path: Path) -> None:
    """An unknown GPT-4-style regex (\\p{N}{1,3}) gets 'llama-bpe' by behaviour, and still tokenises alike."""
    from transformers import AutoTokenizer

    from qlocal.export.pretokenizer import check_pretokenizer

    hf_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir("llama"), hf_dir)
    tj = json.loads((hf_dir / "tokenizer.json").read_text())
    split = tj["pre_tokenizer"]["pretokenizers"][0]["pattern"]
    split["Regex"] = split["Regex"].replace(r"|\s+(?!\S)|\s+", r"|\s+(?!\S)|\s+|\s")  # same behaviour, new text
    (hf_dir / "tokenizer.json").write_text(json.dumps(tj))
    path = convert_hf_to_gguf(hf_dir, tmp_path / "m.gguf")
    assert read_fields(path)["tokenizer.ggml.pre"] == "llama-bpe"
    check = check_pretokenizer(hf_dir)  # suggested by the regex's \p{N}{1,3}, kept because it matches
    assert check.suggested == "llama-bpe" and check.matched and list(check.tried) == ["llama-bpe"]
    tok = AutoTokenizer.from_pretrained(hf_dir)
    llm = load_gguf(path)
    for text in PLAIN_PROBES:
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == tok(text)["input_ids"], text
    llm.close()


@pytest.mark.parametrize("regex,expected", [
    (r"\p{N}{1,3}|\p{L}+|\s+", "llama-bpe"),
    (r"\p{N}|\p{L}+|\s+", "qwen2"),
    (r" ?\p{L}+| ?\p{N}+|\s+", "gpt-2"),
])
def test_choose_pre_heuristic(regex: str, expected: str) -> None:
    """The regex only suggests the name tried first (llama.cpp's own names: GPT-2's is 'gpt-2')."""
    from qlocal.export.gguf_vocab import suggest_pre
    from qlocal.export.pretokenizer import CANDIDATES

    tj = {"pre_tokenizer": {"type": "Split", "pattern": {"Regex": regex}}}
    assert suggest_pre(tj) == expected and expected in CANDIDATES
    assert suggest_pre({"pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}) == "gpt-2"


def test_unsupported_architecture(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(UserError) as e:
        convert_hf_to_gguf(tmp_path, tmp_path / "out.gguf")
    msg = str(e.value)
    assert "\n" not in msg and "GPT2LMHeadModel" in msg
    for family in ("Qwen2", "Qwen3", "Llama", "Mistral", "Gemma 2", "Gemma 3"):
        assert family in msg
    assert not (tmp_path / "out.gguf").exists()


def test_bad_outtype(tiny_model_dir: Any, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="q8_0"):
        convert_hf_to_gguf(tiny_model_dir("qwen2"), tmp_path / "out.gguf", outtype="q4_k_m")
