"""MLX streaming decodes as the torch streamer does: special tokens dropped, no broken characters."""

from __future__ import annotations

import pytest

from qlocal.backends.mlx_infer import text_deltas


@pytest.mark.parametrize("keep_special", [False, True])
def test_text_deltas_match_a_whole_decode(tokenizer_dir, keep_special: bool) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir("qwen2")))
    ids = tok("héllo 世界 🙂<|im_end|>\n<|im_start|>ok 数字123", add_special_tokens=False)["input_ids"]
    assert tok.convert_tokens_to_ids("<|im_end|>") in ids
    pieces = list(text_deltas(iter(ids), tok, keep_special=keep_special))
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=not keep_special)
    assert all(p and "\ufffd" not in p for p in pieces)
    assert ("<|im_end|>" in "".join(pieces)) is keep_special
    assert len(pieces) > 3  # streamed, not one piece at the end
