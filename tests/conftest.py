"""Shared pytest setup: offline env, the `slow` marker, tokenizer assets, tiny random models, CLI runner.

Fixtures
  tokenizer_dir(arch) -> Path         tests/assets/tokenizers/<arch>/ (skips if the asset is absent)
  tiny_model_dir(arch) -> Path        complete HF folder with a tiny random model (session-cached)
  qlocal_cli(*args, cwd=..., input=..., env=...) -> CompletedProcess of `python -m qlocal ...`
Plain functions `make_tiny_model(arch, out_dir)` and `run_qlocal(*args)` do the same outside fixtures.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
ASSETS = Path(__file__).resolve().parent / "assets"

# Under pytest-xdist (scripts/test.sh runs one worker per core) each worker gets its share of the
# cores: more threads than cores makes OpenMP's spinning workers slow each other down.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
_THREADS = str(max(1, min(2, (os.cpu_count() or 2) // _WORKERS)))

# Set before anything imports torch/transformers/huggingface_hub: they read these at import time.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",  # avoids fork warnings/deadlocks in subprocess tests
    "OMP_NUM_THREADS": _THREADS,
    "MKL_NUM_THREADS": _THREADS,
}
os.environ.update(OFFLINE_ENV)

# Model arch -> tokenizer asset folder name (the llama family uses the Llama 3 tokenizer).
TOKENIZER_FOR_ARCH = {"qwen2": "qwen2", "llama": "llama3", "llama3": "llama3", "gemma3": "gemma3",
                      # GGUF-export families: Qwen3 shares Qwen2's tokenizer; llama31 is Llama with
                      # Llama 3.1 rope scaling; Mistral 7B v0.x and Gemma 2 use SentencePiece-style vocabs.
                      "qwen3": "qwen2", "llama31": "llama3", "mistral": "gemma3", "gemma2": "gemma3",
                      # Granite 3.x has a GPT-2-style byte-level BPE; Phi-4-mini a tiktoken-style one.
                      "granite": "qwen2", "phi3": "llama3",
                      # SmolLM3 has Llama 3's tokenizer, OLMo 2 cl100k's (the same split); Mistral Nemo and
                      # Small 3 a tekken one (built by test_pretokenizer's builder, see tekken_tokenizer).
                      "smollm3": "llama3", "olmo2": "llama3", "mistral_nemo": "tekken",
                      "qwen3moe": "qwen2"}  # Qwen3-MoE: Qwen's byte-level BPE, as Qwen3
TINY_ARCHS = ("qwen2", "llama", "gemma3")
EXPORT_ARCHS = ("qwen2", "qwen3", "llama", "llama31", "mistral", "gemma2", "gemma3", "granite", "phi3",
                "smollm3", "olmo2", "mistral_nemo", "qwen3moe")


# ---------------------------------------------------------------- options and markers

def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", default=False,
                     help="also run tests marked slow (the marker's description in pyproject.toml says which). "
                          "Or set QLOCAL_SLOW=1.")
    parser.addoption("--run-long", action="store_true", default=False,
                     help="also run tests marked long (tens of minutes on 2 cores, outside CI's 30-minute "
                          "budget; implies --run-slow). Or set QLOCAL_LONG=1.")


RANK_TEST_PREFIXES = ("test_distributed", "test_preference_distributed")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    long = config.getoption("--run-long") or os.environ.get("QLOCAL_LONG") == "1"
    slow = long or config.getoption("--run-slow") or os.environ.get("QLOCAL_SLOW") == "1"
    for item in items:
        if Path(item.fspath).name.startswith(RANK_TEST_PREFIXES):
            # Tests that launch 2 ranks share one xdist worker (--dist loadgroup): two of them at once
            # would be 4 busy processes on a 2-core box, and their launchers would race for ports.
            item.add_marker(pytest.mark.xdist_group("ranks"))
        if "long" in item.keywords and not long:
            item.add_marker(pytest.mark.skip(reason="long (tens of minutes on 2 cores): run with --run-long or QLOCAL_LONG=1"))
        elif "slow" in item.keywords and not slow:
            item.add_marker(pytest.mark.skip(reason="slow: run with --run-slow or QLOCAL_SLOW=1"))


@pytest.fixture(scope="session", autouse=True)
def _offline_session() -> None:
    """Keep every test offline and cheap on a small CPU box."""
    os.environ.update(OFFLINE_ENV)
    # OMP_NUM_THREADS above caps torch when it is imported later; only adjust an already-imported
    # torch here, so data-only test runs don't pay for importing it.
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(int(_THREADS))


# ---------------------------------------------------------------- tokenizer assets

def tokenizer_path(arch: str) -> Path:
    """Path of the tiny real tokenizer for `arch` (qwen2, llama/llama3, gemma3); skips if absent."""
    name = TOKENIZER_FOR_ARCH.get(arch)
    if name is None:
        raise ValueError(f"no tokenizer asset for arch {arch!r}; known: {sorted(TOKENIZER_FOR_ARCH)}")
    if name == "tekken":
        return tekken_tokenizer()
    path = ASSETS / "tokenizers" / name
    if not (path / "tokenizer_config.json").is_file():
        pytest.skip(f"tokenizer asset {path} is missing")
    return path


# Mistral Small 3 (2501)'s template without its dated default system prompt and tools branch.
MISTRAL_V7_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '[SYSTEM_PROMPT]' + messages[0]['content'] + '[/SYSTEM_PROMPT]' }}{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}{{- '[INST]' + message['content'] + '[/INST]' }}"
    "{%- elif message['role'] == 'assistant' %}{{- message['content'] + eos_token }}{%- endif %}"
    "{%- endfor %}"
)
_TEKKEN_DIR: list[Path] = []


def tekken_tokenizer() -> Path:
    """A Mistral Nemo / Small 3 shaped tokenizer folder, built once per process (no asset on disk).

    test_pretokenizer's tekken builder (byte-level BPE, tekken Split regex, ignore_merges) with
    Mistral's control tokens, <s> added by the post-processor, and the Small 3 chat template.
    """
    if _TEKKEN_DIR:
        return _TEKKEN_DIR[0]
    import atexit
    import shutil
    import tempfile

    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    from qlocal.export.gguf_vocab import TEKKEN_REGEX
    from test_pretokenizer import _byte_level, _split

    # Nemo's first five ids (<unk> <s> </s> [INST] [/INST]); no ChatML tokens, which llama.cpp would
    # take for an end-of-turn token by their text.
    specials = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "<pad>"]
    tok = _byte_level(_split(TEKKEN_REGEX), ignore_merges=True, specials=specials)
    tok.post_processor = processors.TemplateProcessing(single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", chat_template=MISTRAL_V7_TEMPLATE)
    out = Path(tempfile.mkdtemp(prefix="qlocal-tekken-"))
    atexit.register(shutil.rmtree, out, True)  # model folders copy it; nothing reads it after the session
    fast.save_pretrained(str(out))
    _TEKKEN_DIR.append(out)
    return out


@pytest.fixture(scope="session")
def tokenizer_dir() -> Callable[[str], Path]:
    """Factory: tokenizer_dir("qwen2") -> tests/assets/tokenizers/qwen2."""
    return tokenizer_path


# ---------------------------------------------------------------- tiny random models

def _tiny_config(arch: str, tok: Any) -> Any:
    import transformers as tf

    from qlocal.hf import pad_id

    common: dict[str, Any] = dict(
        vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=128, max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=pad_id(tok),
    )
    # Tie embeddings as each family's small models do: Qwen2.5-0.5B and Gemma 3 tie, Llama 3 8B doesn't
    # (so the suite covers both a tied and an untied lm_head).
    if arch == "qwen2":
        return tf.Qwen2Config(**common, tie_word_embeddings=True, rope_theta=1_000_000.0)
    if arch == "llama":
        return tf.LlamaConfig(**common, tie_word_embeddings=False, rope_theta=500_000.0)
    if arch == "gemma3":
        # Gemma 3 defaults head_dim=256; shrink it and its query scale. One sliding + one global
        # layer exercises both attention kinds; the window matches the real 270M (512).
        return tf.Gemma3TextConfig(**common, tie_word_embeddings=True, head_dim=16,
                                   query_pre_attn_scalar=16, sliding_window=512,
                                   layer_types=["sliding_attention", "full_attention"])
    if arch == "qwen3":
        # head_dim != hidden/heads (as in Qwen3-0.6B) exercises the GGUF key_length header.
        return tf.Qwen3Config(**common, tie_word_embeddings=True, head_dim=32, rope_theta=1_000_000.0)
    if arch == "llama31":
        rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 1024, "rope_theta": 500_000.0}
        return tf.LlamaConfig(**common, tie_word_embeddings=True, rope_parameters=rope)
    if arch == "mistral":
        return tf.MistralConfig(**common, tie_word_embeddings=False, rope_theta=1_000_000.0, sliding_window=None)
    if arch == "gemma2":
        return tf.Gemma2Config(**common, tie_word_embeddings=True, head_dim=16, query_pre_attn_scalar=16,
                               sliding_window=512, attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
    if arch == "granite":
        # Granite 3 2B's embedding/residual/logits multipliers, attention's away from 1/sqrt(head_dim),
        # and a larger init (peaked attention), so a header key the GGUF drops shows in the logits.
        return tf.GraniteConfig(**common, tie_word_embeddings=True, rope_theta=10_000.0,
                                embedding_multiplier=12.0, residual_multiplier=0.22,
                                attention_multiplier=0.5, logits_scaling=8.0, initializer_range=0.15)
    if arch == "phi3":
        # Phi-4-mini's shape: partial rotary (0.75) and LongRoPE short/long factors (one per rotary
        # pair); prompts stay under original_max_position_embeddings, so both sides use the short ones.
        # Larger init: peaked attention, so wrong rope factors or attn_factor move the logits.
        rot_pairs = int(0.75 * 16) // 2
        rope = {"rope_type": "longrope", "rope_theta": 10_000.0,
                "short_factor": [1.0 + 0.25 * i for i in range(rot_pairs)],
                "long_factor": [2.0 + 0.5 * i for i in range(rot_pairs)]}
        return tf.Phi3Config(**{**common, "max_position_embeddings": 4096}, tie_word_embeddings=True,
                             partial_rotary_factor=0.75, original_max_position_embeddings=1024,
                             rope_scaling=rope, sliding_window=None, initializer_range=0.15)
    if arch == "smollm3":
        # Four layers, so the fourth is the one without RoPE (no_rope_layer_interval 4, as llama.cpp
        # assumes); a larger init (peaked attention) makes a rotary NoPE layer show in the logits.
        return tf.SmolLM3Config(**{**common, "num_hidden_layers": 4}, tie_word_embeddings=True,
                                rope_theta=2_000_000.0, initializer_range=0.15)
    if arch == "olmo2":
        # OLMo 2 unties its head; its norms are jittered in make_tiny_model (they init to 1, so a
        # q/k norm permuted with the projections or a dropped post-norm would not show otherwise).
        return tf.Olmo2Config(**common, tie_word_embeddings=False, rope_theta=500_000.0, initializer_range=0.1)
    if arch == "mistral_nemo":
        # Nemo/Small 3: MistralForCausalLM whose head_dim (32) is not hidden/heads (16), tekken vocab.
        return tf.MistralConfig(**common, tie_word_embeddings=False, head_dim=32, rope_theta=1_000_000.0,
                                sliding_window=None)
    if arch == "qwen3moe":
        # Qwen3-30B-A3B's shape in small: every layer MoE, 4 experts of which 2 used, renormalised
        # top-k weights (llama.cpp's only mode), head_dim != hidden/heads. Widths are multiples of
        # 32 so Q8_0 covers the 3-D expert tensors; a larger init makes the router's choice and the
        # experts' outputs move the logits (a wrong expert layout shows).
        return tf.Qwen3MoeConfig(**common, tie_word_embeddings=False, head_dim=32, rope_theta=1_000_000.0,
                                 num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                                 norm_topk_prob=True, initializer_range=0.1)
    raise ValueError(f"unknown tiny arch {arch!r}; known: {EXPORT_ARCHS}")


JITTER_NORMS = ("olmo2",)  # archs whose fixture norms get random (non-unit) weights


def make_tiny_model(arch: str, out_dir: Path, seed: int = 0) -> Path:
    """Build a tiny random `arch` model + its tokenizer as a complete HF folder (fp32 safetensors)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_path(arch))
    config = _tiny_config(arch, tok)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    if arch in JITTER_NORMS:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.uniform_(0.5, 1.5)
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    model.save_pretrained(tmp)  # safetensors is the only format in transformers 5
    tok.save_pretrained(tmp)
    tmp.replace(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Factory: tiny_model_dir("qwen2"|"llama"|"gemma3") -> HF model folder, built once per session.

    Treat the folder as read-only: other tests share it (copy it first to modify it).
    """
    root = tmp_path_factory.mktemp("tiny_models")
    cache: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in cache:
            cache[arch] = make_tiny_model(arch, root / arch)
        return cache[arch]

    return get


# ---------------------------------------------------------------- CLI runner

def run_qlocal(*args: str, cwd: Path | str | None = None, input: str | None = None,
               env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run `python -m qlocal *args` offline in a subprocess; never raises on a non-zero exit."""
    full_env = {**os.environ, **OFFLINE_ENV, **(env or {})}
    # So `python -m qlocal` finds this checkout from any cwd (e.g. a tmp_path).
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), full_env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "qlocal", *map(str, args)], cwd=cwd, input=input,
                          env=full_env, capture_output=True, text=True, timeout=timeout)


def run_group(cmd: list[str], env: dict[str, str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run a launcher (torchrun, mlx.launch) and, if it hangs, kill every process it started.

    torchrun starts each worker in a session of its own, so killing the launcher's process group
    misses them; an orphaned gloo/ring worker would spin, starve the rest of the suite, and (with
    pipes) keep the test waiting forever. Output goes to files, so no pipe can fill up.
    """
    import signal
    import tempfile

    import psutil

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=err, text=True, start_new_session=True)
        launcher = psutil.Process(proc.pid)
        started: set[psutil.Process] = set()
        deadline = time.monotonic() + timeout  # a hang guard only: a healthy launch ends long before
        while proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(psutil.Error):
                started.update(launcher.children(recursive=True))
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        for p in started:  # no-ops for workers that already ended
            with contextlib.suppress(psutil.Error):
                p.kill()
        proc.wait()
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read())


@pytest.fixture
def qlocal_cli() -> Callable[..., subprocess.CompletedProcess[str]]:
    """Callable: qlocal_cli("train", "--help") -> CompletedProcess (stdout, stderr, returncode)."""
    return run_qlocal
