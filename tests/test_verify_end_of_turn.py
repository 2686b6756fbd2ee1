"""verify's end-of-turn check: a GGUF must end its turn where the reference does.

The models: a tiny random Llama (256 wide) never emits its end-of-turn token, so on it the check is
"not applicable". Its edited copy ends its turn on probe 1 after K tokens: the head row of
<|eot_id|> gets the minimum-norm change that raises that token's logit 1.0 above every other at
that one position while leaving its logit at every other probe position as it was (a least-squares
solve over the hidden states the head sees). Nothing else changes, so the unedited model's GGUF
against the edited reference has the same NMSE and nearly the same greedy agreement, and only this
check sees that it runs on where the reference stops.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp")
pytest.importorskip("torch")

from qlocal.export import end_of_turn
from qlocal.export.end_of_turn import judge, problem, slack

K = 5
"""Where the edited reference ends its turn on probe 1: its free greedy must run past the 12 tokens
the reference computes (K + slack(K) + 1 = 14), so the check generates beyond a draft too."""
EOT = "<|eot_id|>"


def _end_turn_at(src: Path, dst: Path, k: int) -> Path:
    """Copy of the HF folder `src` whose greedy ends its turn (EOT) at token `k` of probe 1, with
    the EOT logit unchanged at every other position of the probes (prompts and greedy tokens)."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qlocal.export.verify import HFReference

    ref = HFReference(src)
    assert all(EOT not in ref.tokenizer.convert_ids_to_tokens(c) for c in ref.greedy)  # never stops by itself
    tok = AutoTokenizer.from_pretrained(str(src))
    eot = tok.convert_tokens_to_ids(EOT)
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    seen: list[np.ndarray] = []
    hook = model.lm_head.register_forward_hook(lambda m, i, o: seen.append(i[0][0].detach().numpy().copy()))
    head = model.lm_head.weight.detach().numpy()
    rows, targets = [], []
    for p, (ids, cont) in enumerate(zip(ref.chat_ids, ref.greedy)):
        seen.clear()
        with torch.no_grad():
            model(input_ids=torch.tensor([ids + cont]))
        last = len(ids) - 1 + (k if p == 0 else len(cont) - 1)
        for pos in range(last + 1):
            rows.append(seen[0][pos])
            logits = head @ seen[0][pos]
            # At the one position: EOT 1.0 above the best other token; everywhere else: no change.
            targets.append(float(np.delete(logits, eot).max() - logits[eot] + 1.0) if p == 0 and pos == last else 0.0)
    hook.remove()
    delta = np.linalg.lstsq(np.stack(rows), np.array(targets), rcond=None)[0]
    with torch.no_grad():
        model.lm_head.weight[eot] += torch.from_numpy(delta.astype(np.float32))
    model.save_pretrained(dst)
    tok.save_pretrained(dst)
    return Path(dst)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    from export_helpers import make_wide_model

    from qlocal.export import convert_hf_to_gguf

    root = tmp_path_factory.mktemp("eot")
    runs_on = make_wide_model(root / "runs-on")
    stops = _end_turn_at(runs_on, root / "stops", K)
    return {"root": root, "runs_on": runs_on, "stops": stops,
            "runs_on_q8": convert_hf_to_gguf(runs_on, root / "runs-on-q8_0.gguf", "q8_0"),
            "stops_q8": convert_hf_to_gguf(stops, root / "stops-q8_0.gguf", "q8_0"),
            "stops_f16": convert_hf_to_gguf(stops, root / "stops-f16.gguf", "f16")}


def test_gguf_that_ends_its_turn_passes(models) -> None:
    from qlocal.export.verify import table, verify_all

    out = models["root"] / "verify-stops.json"
    checks = verify_all(models["stops"], [(models["stops_q8"], "q8_0"), (models["stops_f16"], "f16")], [EOT], out)
    assert all(c.passed for c in checks), table(checks)
    for c in checks:  # the q8_0 file generates its own greedy; the f16 one (the draft) reuses its draft
        ends = c.ends_turn
        assert ends["reference_at"] == [K, None, None] and ends["gguf_at"][0] == K
        assert ends["status"] == ["stops", "not applicable", "not applicable"] and ends["passed"] is True
        assert ends["limit"][0] == K + slack(K) and ends["reference_margin"][0] == pytest.approx(1.0, abs=1e-3)
    doc = json.loads(out.read_text())
    assert doc["passed"] and doc["files"][0]["ends_turn"]["passed"] is True
    assert "ok     ok    pass" in table(checks).splitlines()[1]


def test_gguf_that_runs_on_fails_where_the_other_checks_pass(models) -> None:
    """The unedited model's GGUF against the edited reference: same logits but the one EOT entry,
    so NMSE and greedy agreement pass; the end-of-turn check alone fails it."""
    from qlocal.export.verify import GREEDY_MIN, table, verify_all

    out = models["root"] / "verify-runs-on.json"
    (check,) = verify_all(models["stops"], [(models["runs_on_q8"], "q8_0")], [EOT], out)
    ends = check.ends_turn
    assert ends["reference_at"] == [K, None, None] and ends["gguf_at"] == [None, None, None]
    assert ends["status"][0] == "does not stop" and ends["passed"] is False
    assert check.greedy_agree >= GREEDY_MIN and check.nmse < check.nmse_limit and check.stops_ok
    assert check.problems == [f"q8_0 does not end its turn on probe 1 (reference stops after {K} tokens; the GGUF "
                              f"had not stopped after {K + slack(K) + 1}): use --quant f16, or train longer so "
                              "the end of turn is learned"]
    assert not check.passed and json.loads(out.read_text())["passed"] is False
    assert "FAIL  FAIL: q8_0 does not end its turn on probe 1" in table([check])


def test_reference_that_never_stops_is_not_applicable(models) -> None:
    from qlocal.export.verify import table, verify_all

    (check,) = verify_all(models["runs_on"], [(models["runs_on_q8"], "q8_0")], [EOT],
                          models["root"] / "verify-na.json")
    ends = check.ends_turn
    assert ends["reference_at"] == [None] * 3 and ends["status"] == ["not applicable"] * 3
    assert ends["passed"] is None  # not a pass: nothing was checked
    assert check.passed, table([check])  # and not a failure of the file either
    assert " n/a   pass" in table([check])


def test_judge_and_message() -> None:
    assert [slack(k) for k in (0, 7, 16, 17, 30)] == [8, 8, 8, 9, 15]
    late = judge([4, 20, None], [13, 30, 3], 40, [0.2, 0.5, None])
    assert late["status"] == ["does not stop", "stops", "not applicable"] and late["passed"] is False
    assert late["limit"] == [12, 30, None]
    msg = problem("q4_k_m", late, exact=False)
    assert msg == ("q4_k_m does not end its turn on probe 1 (reference stops after 4 tokens; the GGUF after 13): "
                   "use --quant q5_k_m/q8_0, or train longer so the end of turn is learned")
    assert "report this" in problem("f16", late, exact=True)
    assert problem("q6_k", late, exact=False).endswith("use --quant q8_0/f16, or train longer so the end of turn is learned")
    assert problem("q4_k_m", judge([4], [2], 12, [0.1]), exact=False) is None  # stopping earlier is stopping
    assert end_of_turn.cell(judge([None], [None], 12, [None])) == "n/a"
