"""Quantisation: choice parsing, llama.cpp K-quants from an F16 GGUF, honest fallback accounting."""

from __future__ import annotations

from pathlib import Path

import pytest

from qlocal.errors import UserError
from qlocal.export.quantize import ALL_QUANTS, parse_quants


def test_parse_quants() -> None:
    assert parse_quants("q4_k_m, Q8_0,f16,q4_k_m") == ["q4_k_m", "q8_0", "f16"]
    assert parse_quants(["q6_k"]) == ["q6_k"]
    with pytest.raises(UserError, match="q4_k_m") as e:
        parse_quants("q4_k_m,q9_x")
    assert "'q9_x'" in str(e.value) and all(q in str(e.value) for q in ALL_QUANTS)
    with pytest.raises(UserError):
        parse_quants(" , ")


@pytest.fixture(scope="module")
def f16_ggufs(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    pytest.importorskip("llama_cpp")
    pytest.importorskip("torch")
    from export_helpers import make_wide_model

    from qlocal.export import convert_hf_to_gguf

    root = tmp_path_factory.mktemp("quant")
    wide = make_wide_model(root / "wide")
    return {"narrow": convert_hf_to_gguf(tiny_model_dir("llama"), root / "narrow-f16.gguf", "f16"),
            "wide": convert_hf_to_gguf(wide, root / "wide-f16.gguf", "f16")}


@pytest.mark.parametrize("quant", ["q4_k_m", "q5_k_m", "q6_k", "q4_0", "q5_0"])
def test_kquants_on_256_wide_model(quant: str, f16_ggufs, tmp_path: Path) -> None:
    from qlocal.export.quantize import quantize_gguf

    out = tmp_path / f"m-{quant}.gguf"
    rep = quantize_gguf(f16_ggufs["wide"], out, quant)
    assert out.is_file() and rep.bytes < f16_ggufs["wide"].stat().st_size
    assert rep.fallback_tensors == 0, rep.tensor_types
    main_type = {"q4_k_m": "Q4_K", "q5_k_m": "Q5_K", "q6_k": "Q6_K", "q4_0": "Q4_0", "q5_0": "Q5_0"}[quant]
    assert rep.tensor_types.get(main_type, 0) > 0, rep.tensor_types
    assert not list(tmp_path.glob(".*tmp*"))


def test_kquant_fallback_is_reported_on_64_wide_model(f16_ggufs, tmp_path: Path) -> None:
    """Hidden 64: llama.cpp cannot use 256-element K blocks and stores q5_0/q8_0 instead; we say so."""
    from qlocal.export.quantize import quantize_gguf

    rep = quantize_gguf(f16_ggufs["narrow"], tmp_path / "m.gguf", "q4_k_m")
    assert "Q4_K" not in rep.tensor_types
    assert rep.fallback_tensors > 0


def test_bad_input_leaves_nothing(tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp")
    from qlocal.export.quantize import quantize_gguf

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(UserError, match="could not quantise"):
        quantize_gguf(bad, tmp_path / "out.gguf", "q4_k_m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf"]
    with pytest.raises(UserError, match="directly"):
        quantize_gguf(bad, tmp_path / "out.gguf", "f16")
