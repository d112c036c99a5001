"""Cold eager ``model.init`` time: resflax's initialisers (draws compiled at LLVM -O1 on the CPU) against JAX's
own (XLA's default -O2), each in a fresh process with no compilation cache, alternated over ``--rounds``.

    python benchmarks/init_time.py --models resnet20 resnet110 resnet50 vgg16 --rounds 2

Prints one JSON line per model (median seconds of each, their ratio, and whether both gave the same
variables bit for bit) and a markdown table; see docs/performance.md ("Start-up: initialisation").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CHILD = """
import hashlib, json, sys, time
import jax, jax.numpy as jnp, numpy as np
from resflax.models import get_model, initializers, model_spec
if sys.argv[2] == "jax":  # JAX's own initialisers' code path: the draws compiled at XLA's default
    initializers._tested_jaxlib = lambda: False
name = sys.argv[1]
hw = 224 if model_spec(name)["stem"] == "imagenet" else 32
model = get_model(name)
x = jnp.zeros((1, hw, hw, 3), jnp.float32)
jax.block_until_ready(x)
t = time.perf_counter()
v = jax.block_until_ready(model.init(jax.random.PRNGKey(0), x, train=False))
s = time.perf_counter() - t
h = hashlib.sha256(b"".join(np.asarray(a).tobytes() for a in jax.tree_util.tree_leaves(v))).hexdigest()[:16]
print(json.dumps({"seconds": s, "digest": h}))
"""


def _once(name: str, which: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run([sys.executable, "-c", CHILD, name, which], env=env, capture_output=True, text=True,
                         timeout=900)
    if out.returncode != 0:
        raise SystemExit(f"init_time: {name} ({which}) failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet20", "resnet110", "resnet50", "vgg16"])
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    rows = []
    for name in args.models:
        times = {"resflax": [], "jax": []}
        digests = set()
        for _ in range(args.rounds):
            for which in ("jax", "resflax"):
                r = _once(name, which)
                times[which].append(r["seconds"])
                digests.add(r["digest"])
        row = {"model": name, "jax_s": statistics.median(times["jax"]),
               "resflax_s": statistics.median(times["resflax"]), "same_values": len(digests) == 1,
               "rounds": args.rounds, "when": time.strftime("%Y-%m-%d")}
        row["speedup"] = row["jax_s"] / row["resflax_s"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| model | JAX's initialisers s | resflax's s | speed-up | same values |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['jax_s']:.1f} | {r['resflax_s']:.1f} | {r['speedup']:.2f}x | "
              f"{'yes' if r['same_values'] else 'NO'} |")
    return 0 if all(r["same_values"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
