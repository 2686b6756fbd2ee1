"""GGUF verification: passes for correct files of every tiny family, and fails for wrong ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp")
pytest.importorskip("torch")

from export_helpers import make_run

from qlocal.export import convert_hf_to_gguf
from qlocal.export.fuse import fuse_run
from qlocal.export.verify import table, verify_all

STOPS = {"qwen2": ["<|im_end|>"], "llama": ["<|eot_id|>"], "gemma3": ["<end_of_turn>", "<eos>"]}


@pytest.fixture(scope="module")
def fused(tiny_model_dir, tmp_path_factory):
    cache: dict[str, tuple[Path, Path]] = {}

    def get(arch: str) -> tuple[Path, Path]:
        if arch not in cache:
            root = tmp_path_factory.mktemp(f"verify-{arch}")
            run = make_run(tiny_model_dir(arch), root / "run")
            fuse_run(run, root / "fused")
            cache[arch] = (root / "fused", root)
        return cache[arch]

    return get


@pytest.mark.parametrize("arch", ["qwen2", "llama", "gemma3"])
def test_f16_and_q8_pass(arch: str, fused) -> None:
    hf, root = fused(arch)
    files = [(convert_hf_to_gguf(hf, root / f"m-{q}.gguf", q), q) for q in ("f16", "q8_0")]
    checks = verify_all(hf, files, STOPS[arch], root / "verify.json")
    doc = json.loads((root / "verify.json").read_text())
    assert doc["passed"], table(checks)
    f16 = checks[0]
    assert f16.tokenizer_match and f16.nmse < 1e-3 and f16.greedy_agree == 1.0 and f16.stops_ok
    assert checks[1].nmse < 1e-2
    assert all(d["ends_generation"] for d in f16.stop_details["stops"].values())
    assert "pass" in table(checks)


def test_wrong_weights_fail(fused, tiny_model_dir) -> None:
    """The un-fused base converted to GGUF must not pass as the fused model: the check has teeth."""
    hf, root = fused("llama")
    base_gguf = convert_hf_to_gguf(tiny_model_dir("llama"), root / "base-f16.gguf", "f16")
    (check,) = verify_all(hf, [(base_gguf, "f16")], STOPS["llama"], root / "verify-wrong.json")
    assert not check.passed and check.nmse > 1e-3
    assert any("NMSE" in p for p in check.problems)


def test_stop_set_must_be_end_of_generation(fused) -> None:
    hf, root = fused("qwen2")
    gguf = convert_hf_to_gguf(hf, root / "m-f16-stops.gguf", "f16")
    # "<|im_start|>" is a special token but not end-of-generation; and the EOS is missing from the set.
    (check,) = verify_all(hf, [(gguf, "f16")], ["<|im_start|>"], root / "verify-stops.json")
    assert not check.stops_ok and not check.passed
    assert check.stop_details["stops"]["<|im_start|>"]["eog"] is False
    assert check.stop_details["eos"]["in_stop_set"] is False


def test_reference_from_a_gguf_draft_equals_plain_greedy(fused) -> None:
    """The GGUF's own greedy tokens as a draft: the reference takes one forward for the whole
    continuation, and its tokens and logits are plain greedy decoding's."""
    import numpy as np

    from qlocal.export.verify import GREEDY_TOKENS, HFReference

    hf, root = fused("qwen2")
    gguf = convert_hf_to_gguf(hf, root / "m-f16-draft.gguf", "f16")
    plain, drafted = HFReference(hf), HFReference(hf, draft=gguf)
    assert plain.forwards == GREEDY_TOKENS and drafted.forwards < GREEDY_TOKENS
    assert drafted.greedy == plain.greedy
    for a, b in zip(drafted.logits + drafted.teacher, plain.logits + plain.teacher):
        assert a.shape == b.shape and float(np.abs(a - b).max()) < 1e-4
