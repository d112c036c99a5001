"""Throughput table of resflax's real train step on an accelerator, in one process.

    python benchmarks/gpu_table.py --out runs/gpu/throughput.jsonl [--deadline_s 240]

For each (model, dtype, batch) it builds the real ``make_train_step`` with synthetic data resident on the
device, times the median of N steps after warm-up, and appends one JSON line; a global deadline stops it
cleanly, so the most important rows come first. Prints a markdown table at the end.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import jax
import numpy as np

from resflax.models import get_model
from resflax.train import state as state_lib
from resflax.train import step as step_lib
from resflax.train.loop import DTYPES

# (model, dtype, batch[, impl]): impl picks the model's layer implementation where the model has that field.
ROWS = [
    ("resnet20", "float32", 128), ("resnet20", "float32", 128, "flax"), ("resnet20", "bfloat16", 128),
    ("resnet110", "float32", 128), ("resnet110", "float32", 128, "flax"), ("resnet110", "bfloat16", 128),
    ("resnet50", "float32", 128), ("resnet50", "bfloat16", 128),
    ("resnet20", "float32", 256), ("resnet20", "bfloat16", 256), ("resnet110", "float32", 256),
    ("resnet110", "bfloat16", 256), ("resnet50", "float32", 256), ("resnet50", "bfloat16", 256),
]


def measure(model_name: str, dtype: str, batch: int, steps: int, warmup: int, impl: str | None = None) -> dict:
    model = get_model(model_name, dtype=DTYPES[dtype], **({"impl": impl} if impl else {}))
    hw = 224 if model.stem == "imagenet" else 32
    mesh = step_lib.make_mesh()
    tx_fn = functools.partial(state_lib.make_optimizer, momentum=0.9, weight_decay=1e-4, weight_decay_on="all")
    s = step_lib.replicate(state_lib.init_state(model, tx_fn, 0, (hw, hw, 3), warmup=False), mesh)
    rs = np.random.RandomState(0)
    n = max(2 * batch, 512) if hw == 32 else 2 * batch
    data = step_lib.replicate((rs.randint(0, 256, (n, hw, hw, 3)).astype(np.uint8),
                               rs.randint(0, model.num_classes, n).astype(np.int32),
                               np.zeros((hw, hw, 3), np.float32)), mesh)
    cfg = step_lib.step_config((10**9,), batch_size=batch, base_lr=0.1, factor=0.1, warmup_lr=0.01,
                               warmup_until_error=0.8)
    step = step_lib.make_train_step(model, tx_fn(s.params), cfg, mesh)
    t = time.perf_counter()
    compiled = step.lower(s, *data).compile()
    compile_s = time.perf_counter() - t
    for _ in range(warmup):
        s, m = compiled(s, *data)
    jax.block_until_ready(s)
    times = []
    for _ in range(5):  # median of 5 blocks of `steps` steps: per-step time without host syncs in between
        t = time.perf_counter()
        for _ in range(steps):
            s, m = compiled(s, *data)
        jax.block_until_ready(s)
        times.append((time.perf_counter() - t) / steps)
    step_s = statistics.median(times)
    return {"model": model_name, "dtype": dtype, "batch": batch, "impl": getattr(model, "impl", None),
            "compile_s": round(compile_s, 2),
            "step_s": step_s, "images_per_s": batch / step_s, "device": jax.devices()[0].device_kind,
            "jax": jax.__version__, "loss_finite": bool(np.isfinite(float(m["loss"])))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--deadline_s", type=float, default=240.0)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rows", type=int, default=len(ROWS))
    args = ap.parse_args()
    t0 = time.time()
    results = []
    for row in ROWS[: args.rows]:
        if time.time() - t0 > args.deadline_s:
            print(f"deadline reached; skipped {row} and the rest", flush=True)
            break
        try:
            r = measure(*row[:3], args.steps, warmup=3, impl=row[3] if len(row) > 3 else None)
        except Exception as e:  # noqa: BLE001 (one failing row must not lose the table)
            print(f"{row}: failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        results.append(r)
        with open(args.out, "a") as f:
            f.write(json.dumps(r) + "\n")
        print(json.dumps(r), flush=True)
    device = results[0]["device"] if results else "?"
    print(f"\n| model | dtype | batch | impl | img/s | step ms | compile s |  ({device})")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['model']} | {r['dtype']} | {r['batch']} | {r['impl']} | {r['images_per_s']:.0f} "
              f"| {1e3 * r['step_s']:.2f} "
              f"| {r['compile_s']:.1f} |")


if __name__ == "__main__":
    main()
