"""Scanned vs unrolled stages (``ResNet.scan_min_blocks``), side by side in one process.

Builds the real train step twice, once with every stage unrolled and once with the stages of at least
``--scan-min-blocks`` blocks run as a ``lax.scan``, reports both compile times and times the two steps
interleaved (median of ``--rounds``), so the step-time ratio is measured under the same machine load.

    python benchmarks/scan_ab.py --model resnet110 --batch 128 --scan-min-blocks 2 --json
    python benchmarks/scan_ab.py --model resnet1202 --batch 8 --rounds 3 --json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import step_time  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet110")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--scan-min-blocks", type=int, default=64, help="the scanned variant's ResNet.scan_min_blocks")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    steps, out = {}, {"model": a.model, "batch": a.batch}
    for name, smb in (("unrolled", "none"), ("scanned", str(a.scan_min_blocks))):
        args = step_time._parse(["--model", a.model, "--batch", str(a.batch), "--scan-min-blocks", smb])
        steps[name], compile_s, _ = step_time.build(args)
        out[f"{name}_compile_s"] = round(compile_s, 2)
        print(f"{name}: compiled in {compile_s:.1f} s", file=sys.stderr, flush=True)
    times = {k: [] for k in steps}
    for s in steps.values():
        s()  # warm-up
    for _ in range(a.rounds):
        for k, s in steps.items():
            t0 = time.perf_counter()
            s()
            times[k].append(time.perf_counter() - t0)
    for k, t in times.items():
        out[f"{k}_step_s"] = round(statistics.median(t), 4)
    out["scan_min_blocks"] = a.scan_min_blocks
    out["step_ratio_scanned_over_unrolled"] = round(out["scanned_step_s"] / out["unrolled_step_s"], 3)
    out["loadavg_1m"] = round(os.getloadavg()[0], 2)
    out["command"] = "python benchmarks/scan_ab.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(json.dumps(out) if a.json else "\n".join(f"{k:>34s}: {v}" for k, v in out.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
