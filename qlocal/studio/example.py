"""One training example of a run, rendered as `qlocal data check` renders it (the run's tokenizer,
saved template and data settings), as (text, trained) segments for the Run page to highlight."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any


def run_example(run: Path, root: Path) -> dict[str, Any]:
    """{"where": record location, "segments": [[text, trained], ...], "truncated": bool}."""
    cfg_file = run / "config.yaml"
    return _cached(str(run), cfg_file.stat().st_mtime_ns, str(root))


@functools.lru_cache(maxsize=16)
def _cached(run_s: str, mtime: int, root_s: str) -> dict[str, Any]:
    from qlocal import rundir
    from qlocal.data.formats import load_samples
    from qlocal.data.mapping import mapping_from_config
    from qlocal.data.render import mask_runs, render
    from qlocal.hf import load_tokenizer

    run, root = Path(run_s), Path(root_s)
    cfg, resolved = rundir.load_config(run)
    dc = cfg.data
    data = Path(dc.path)
    path = str(data if data.is_absolute() or not (root / data).exists() else root / data)
    tokenizer = load_tokenizer(Path(resolved["model_path"]), cfg.model.trust_remote_code, cfg.lora.new_tokens)
    template = (run / "chat_template.jinja").read_text(encoding="utf-8")
    samples, _ = load_samples(path, dc.format, dc.split, skip_bad_lines=True, mapping=mapping_from_config(dc),
                              tools=dc.tools)
    if not samples:
        return {"where": path, "segments": [], "truncated": False}
    # The first sample that calls a tool, as data check picks it.
    shown = next((s for s in samples if any(m.get("tool_calls") for m in s.messages)), samples[0])
    ex = render(shown, tokenizer, template, dc.train_on_prompt, dc.max_seq_len,
                train_on_reasoning=getattr(dc, "train_on_reasoning", True))
    segments = [[tokenizer.decode(ids, skip_special_tokens=False), bool(on)] for on, ids in mask_runs(ex)]
    return {"where": shown.where, "segments": segments, "truncated": bool(ex.truncated)}
