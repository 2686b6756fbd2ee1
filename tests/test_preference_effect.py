"""DPO has a real effect: on the sample pairs (data/prefs_sample.jsonl: the same fact in both answers,
the chosen one opening "Sure...", the rejected one curt: "Obviously,", "Look,", "Ugh, fine."), a tiny
random Qwen2 trained with `train.method: dpo` prefers the chosen answers of held-out pairs, and its
greedy answers to held-out prompts open in the chosen style, where the base's do not."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from qlocal import config as config_mod

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_dpo_learns_the_chosen_style_on_held_out_pairs(tiny_model_dir, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    from qlocal import reference
    from qlocal.backends.base import Sampling
    from qlocal.backends.torch_backend import TorchBackend
    from qlocal.data.preference import collate_pairs
    from qlocal.hf import load_tokenizer, pad_id
    from qlocal.preference_losses import DPO
    from qlocal.train import train
    from qlocal.train_data import prepare_data

    model = tiny_model_dir("qwen2")
    sets = {"model.name": model, "data.path": REPO / "data/prefs_sample.jsonl", "run.output_dir": tmp_path,
            "run.name": "dpo", "train.backend": "torch", "train.method": "dpo", "train.iters": 20,
            "train.batch_size": 8, "train.lr": 5e-3, "train.lr_schedule": "constant", "data.max_seq_len": 160,
            "data.val_split": 0.2, "lora.dropout": 0.0}
    cfg = config_mod.build(sets=[f"{k}={v}" for k, v in sets.items()])
    run = train(cfg, quiet=True)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < 0.5 * rows[0]["loss"]

    # The held-out pairs, exactly as training split them off (data.val_split, train.seed).
    tok = load_tokenizer(model)
    held_out = prepare_data(cfg, tok, None).val
    assert len(held_out) >= 10
    backend = TorchBackend()
    backend.setup(model, cfg)
    backend.load_adapter(run / "adapter")
    batch = collate_pairs(held_out, pad_id(tok))
    (scored,) = reference.complete(backend, [batch], DPO())
    ratio = backend.sequence_logprobs(batch) - scored["ref_logp"]  # policy minus base, per row
    n = len(held_out)
    accuracy = float(np.mean(ratio[:n] > ratio[n:]))
    assert accuracy > 0.9, accuracy

    def greedy_openings(adapter_on: bool) -> list[str]:
        backend.set_adapter_enabled(adapter_on)
        try:
            return ["".join(backend.stream(ex.prompt_ids, tok, [tok.eos_token_id], Sampling(max_tokens=6)))
                    for ex in held_out]
        finally:
            backend.set_adapter_enabled(True)

    def polite(texts: list[str]) -> float:
        return float(np.mean([t.lstrip().startswith("Sure") for t in texts]))

    base, tuned = greedy_openings(False), greedy_openings(True)
    assert polite(base) < 0.2, base
    assert polite(tuned) > 0.9, tuned
    assert not any(t.lstrip().startswith(("Obviously", "Look", "Ugh")) for t in tuned), tuned
