"""qlocal's MLX backend vs `mlx_lm.lora`'s trainer: tokens/s and peak memory on the same model and data.

    python bench/mlx_throughput.py [--hidden 256 --layers 4 --iters 8 --batch-size 4 --rounds 3 --mlx-lm-padding native]
    python bench/mlx_throughput.py --vocab 151936 --max-seq-len 1024   # the issue-17 target case
    python bench/mlx_throughput.py --synthetic --max-seq-len 4096 --json out.json   # bench/scaling.py's rows

Both sides get a small random Qwen2-shaped model (built here with mlx-lm's own Qwen2 class and
saved as an HF folder with the tiny Qwen2 tokenizer from tests/assets), LoRA rank 8 / alpha 16 on
every linear layer of every block, and the very same micro-batches: data/alpaca_sample.jsonl
rendered and batched by qlocal's data code. mlx-lm pads each batch its own way (1 + a multiple of
32); qlocal gets the same examples packed, as its trainer packs them (--no-packing: padded to a
multiple of 16). tokens/s counts real (non-pad) tokens on both sides, trained/cpu-s the target
tokens (prompt masked on both sides). --vocab 151936 gives the head Qwen2's real vocabulary.
--synthetic replaces the sample data with chat examples of 3/4 to all of max_seq_len tokens (the
generator of bench/train_throughput.py), so the work grows with the sequence length.

Each side runs the batch list twice in one training call: the first pass compiles every shape,
the second is timed (--no-warm-pass: one pass, timed, compilation included), by the wall clock and by this process's CPU time (tok/cpu-s: far less disturbed when
other processes share the machine). Peak memory is MLX's allocator peak (mx.get_peak_memory) from model load on.
Rounds alternate which side goes first; the median is reported.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def build_model(out: Path, hidden: int, layers: int, vocab_size: int = 0) -> Path:
    """A random Qwen2-shaped model as an HF folder (config.json + model.safetensors + tokenizer).

    vocab_size > 0 gives the embedding and head that many rows (Qwen2's real 151,936) while the
    tiny tokenizer's ids stay below it."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import qwen2

    from transformers import AutoTokenizer

    tok_dir = REPO / "tests/assets/tokenizers/qwen2"
    vocab = len(AutoTokenizer.from_pretrained(str(tok_dir)))
    config = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": hidden,
              "num_hidden_layers": layers, "intermediate_size": int(hidden * 2.75) // 64 * 64,
              "num_attention_heads": hidden // 64, "num_key_value_heads": max(1, hidden // 256),
              "rms_norm_eps": 1e-6, "vocab_size": max(vocab, vocab_size), "rope_theta": 1e6, "tie_word_embeddings": True,
              "max_position_embeddings": 4096, "torch_dtype": "float32"}
    mx.random.seed(0)
    model = qwen2.Model(qwen2.ModelArgs.from_dict(config))
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())),
                        metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=1))
    for f in tok_dir.iterdir():
        shutil.copy(f, out / f.name)
    return out


def make_batches(model_dir: Path, n: int, batch_size: int, max_len: int,
                 packed: bool = False, synthetic: bool = False) -> list[dict[str, np.ndarray]]:
    """n micro-batches of the sample data (or synthetic examples near max_len) through qlocal's
    render + length-bucketed batching (padded, or the same examples packed as qlocal's trainer packs them)."""
    from transformers import AutoTokenizer

    from qlocal.data.batching import collate, collate_packed, epoch_batches
    from qlocal.data.formats import load_samples
    from qlocal.data.render import render
    from qlocal.data.templates import resolve_chat_template
    from qlocal.hf import pad_id

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    template, _ = resolve_chat_template(tok, None)
    samples, _ = load_samples(str(REPO / "data/alpaca_sample.jsonl"))
    examples = [render(s, tok, template, max_seq_len=max_len) for s in samples]
    if synthetic:
        sys.path.insert(0, str(REPO / "bench"))
        from train_throughput import examples as synthetic_examples

        examples = synthetic_examples({"seq": max_len, "min_len": 0.75}, n * batch_size)
    pad = pad_id(tok)
    order: list[list[int]] = []
    epoch = 0
    while len(order) < n:
        order += epoch_batches([len(e.input_ids) for e in examples], batch_size, 0, epoch)
        epoch += 1
    if packed:
        return [collate_packed([examples[i] for i in b]) for b in order[:n]]
    return [collate([examples[i] for i in b], pad) for b in order[:n]]


def _fresh_memory() -> None:
    import gc

    import mlx.core as mx

    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()


def run_qlocal(model_dir: Path, batches: list[dict[str, np.ndarray]], rank: int, alpha: float,
               warm: bool = True) -> dict[str, float]:
    import mlx.core as mx

    from qlocal import config as config_mod
    from qlocal.backends.mlx_backend import MLXBackend

    _fresh_memory()
    cfg = config_mod.build(sets=[f"model.name={model_dir}", f"lora.rank={rank}", f"lora.alpha={alpha}",
                                 "train.backend=mlx", "train.lr=1e-4"])
    backend = MLXBackend()
    backend.setup(model_dir, cfg)
    for b in batches if warm else []:  # pass 1: compiles every shape
        backend.train_step([b], 1e-4)
    t0, c0 = time.perf_counter(), time.process_time()
    for b in batches:
        loss = backend.train_step([b], 1e-4).loss
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"seconds": dt, "cpu_seconds": cpu, "peak_mb": mx.get_peak_memory() / 2**20, "last_loss": loss}


def _mlx_lm_batches(batches: list[dict[str, np.ndarray]], max_len: int, padding: str):  # type: ignore[no-untyped-def]
    """Our batches as mlx_lm's iterate_batches yields them: ids padded (its way: 1 + a multiple of 32,
    or qlocal's width with padding="qlocal") and (offset, length) per row."""
    import mlx.core as mx

    from qlocal.backends.mlx_backend import PAD_MULTIPLE

    def iterate(dataset, batch_size, max_seq_length, loop=False, seed=None, comm_group=None):  # noqa: ANN001
        while True:
            for b in batches:
                lengths = b["attention_mask"].sum(1)
                offsets = b["loss_mask"].argmax(1)  # first trained token (alpaca: one contiguous answer)
                if padding == "native":
                    width = min(1 + 32 * ((int(lengths.max()) + 31) // 32), max_len + 1)
                else:
                    width = -(-b["input_ids"].shape[1] // PAD_MULTIPLE) * PAD_MULTIPLE
                arr = np.zeros((len(lengths), width), np.int32)
                arr[:, : b["input_ids"].shape[1]] = b["input_ids"][:, :width]
                yield mx.array(arr), mx.array(np.stack([offsets, lengths], 1))
            if not loop:
                break

    return iterate


def run_mlx_lm(model_dir: Path, batches: list[dict[str, np.ndarray]], rank: int, alpha: float,
               max_len: int, padding: str, warm: bool = True) -> dict[str, float]:
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm.tuner.trainer import TrainingArgs, train
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model

    _fresh_memory()
    model, _ = load_model(model_dir)
    model.freeze()
    mx.random.seed(0)
    linear_to_lora_layers(model, len(model.layers), {"rank": rank, "scale": alpha / rank, "dropout": 0.0})
    reports: list[dict[str, float]] = []

    class Collect(TrainingCallback):
        def on_train_loss_report(self, info: dict) -> None:  # type: ignore[override]
            reports.append({**info, "cpu": time.process_time()})

    n = len(batches)
    reports.append({"cpu": time.process_time()})  # without the warm pass: CPU from the train call on
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        args = TrainingArgs(batch_size=batches[0]["input_ids"].shape[0], iters=(1 + warm) * n, steps_per_report=n,
                            steps_per_save=10**9, max_seq_length=max_len + 1,
                            adapter_file=str(Path(tmp) / "adapters.safetensors"))
        train(model, optim.Adam(learning_rate=1e-4), train_dataset=list(range(n)), args=args,
              iterate_batches=_mlx_lm_batches(batches, max_len, padding), training_callback=Collect())
    # The last report covers exactly the last pass (mlx-lm times only its step calls).
    return {"seconds": n / reports[-1]["iterations_per_second"], "cpu_seconds": reports[-1]["cpu"] - reports[-2]["cpu"],
            "peak_mb": mx.get_peak_memory() / 2**20,
            "last_loss": reports[-1]["train_loss"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--iters", type=int, default=8, help="timed steps per side (after as many warm-up steps)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-seq-len", type=int, default=256)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=0, help="embedding/head rows (0: the tiny tokenizer's; 151936: Qwen2's)")
    ap.add_argument("--no-packing", action="store_true", help="give qlocal the padded batches mlx_lm gets")
    ap.add_argument("--synthetic", action="store_true", help="examples of 3/4 to all of max-seq-len tokens")
    ap.add_argument("--no-warm-pass", action="store_true",
                    help="time the first pass (compilation included) instead of a second one: half the run")
    ap.add_argument("--json", help="also write the medians here")
    ap.add_argument("--mlx-lm-padding", choices=["native", "qlocal"], default="native",
                    help="pad mlx_lm's batches its own way (default) or to qlocal's widths (identical FLOPs)")
    a = ap.parse_args()

    import mlx.core as mx
    import mlx_lm

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(Path(tmp) / "qwen2-bench", a.hidden, a.layers, a.vocab)
        batches = make_batches(model_dir, a.iters, a.batch_size, a.max_seq_len, synthetic=a.synthetic)
        ours = batches if a.no_packing else make_batches(model_dir, a.iters, a.batch_size, a.max_seq_len,
                                                         packed=True, synthetic=a.synthetic)
        tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        trained = sum(int(b["loss_mask"][:, 1:].sum()) for b in batches)
        results: dict[str, list[dict[str, float]]] = {"qlocal": [], "mlx_lm": []}
        for r in range(a.rounds):
            sides = ["mlx_lm", "qlocal"] if r % 2 == 0 else ["qlocal", "mlx_lm"]
            for side in sides:
                if side == "qlocal":
                    res = run_qlocal(model_dir, ours, a.rank, a.alpha, not a.no_warm_pass)
                else:
                    res = run_mlx_lm(model_dir, batches, a.rank, a.alpha, a.max_seq_len, a.mlx_lm_padding,
                                     not a.no_warm_pass)
                res["tok_s"] = tokens / res["seconds"]
                res["tok_cpu_s"] = tokens / res["cpu_seconds"]
                res["trained_cpu_s"] = trained / res["cpu_seconds"]
                results[side].append(res)
                print(f"round {r + 1} {side:7s} {res['tok_s']:9.1f} tok/s  {res['tok_cpu_s']:9.1f} tok/cpu-s  peak {res['peak_mb']:8.1f} MB  "
                      f"(own loss definition: {res['last_loss']:.4f})", file=sys.stderr)

    keys = ("tok_s", "tok_cpu_s", "trained_cpu_s", "peak_mb")
    med = {s: {k: statistics.median(x[k] for x in rs) for k in keys} for s, rs in results.items()}
    print(f"\nmachine   {platform.machine()} {platform.system()}, mlx {mx.__version__} on {mx.default_device()}, "
          f"mlx-lm {mlx_lm.__version__}")
    vocab = a.vocab or "of the tokenizer"
    print(f"model     random Qwen2 shape: hidden {a.hidden}, {a.layers} layers, vocab {vocab}; "
          f"LoRA r{a.rank} a{a.alpha:g} all linear")
    print(f"data      {a.iters} batches x {a.batch_size} ({'synthetic' if a.synthetic else 'alpaca_sample'}, max_seq_len {a.max_seq_len}), "
          f"{tokens} real / {trained} trained tokens per pass; qlocal {'padded' if a.no_packing else 'packed'}, "
          f"mlx_lm padding {a.mlx_lm_padding}; median of {a.rounds} rounds"
          f"{'; first pass timed (compilation included)' if a.no_warm_pass else ''}")
    print(f"{'':10s}{'tokens/s':>12s}{'tok/cpu-s':>12s}{'trained/cpu-s':>14s}{'peak MB':>12s}")
    for s in ("qlocal", "mlx_lm"):
        print(f"{s:10s}{med[s]['tok_s']:12.1f}{med[s]['tok_cpu_s']:12.1f}{med[s]['trained_cpu_s']:14.1f}"
              f"{med[s]['peak_mb']:12.1f}")
    if a.json:
        Path(a.json).write_text(json.dumps({"median": med, "tokens": tokens, "trained": trained}, indent=1))
    q, m = med["qlocal"], med["mlx_lm"]
    print(f"ratio     {q['tok_s'] / m['tok_s']:11.2f}x{q['tok_cpu_s'] / m['tok_cpu_s']:11.2f}x"
          f"{q['trained_cpu_s'] / m['trained_cpu_s']:13.2f}x{q['peak_mb'] / m['peak_mb']:11.2f}x"
          "   (qlocal / mlx_lm; targets: >= 1.5x trained/cpu-s, <= 0.5x peak)")


if __name__ == "__main__":
    main()
