"""How far resflax's fast layers land from the straightforward Flax ones under each value of XLA:CPU's
YNNPACK fusion flag: the comparisons of ``tests/test_speed_numerics.py``, measured instead of asserted.

    python benchmarks/flag_numerics.py                     # XLA's default, eltwise, reduce, eltwise,reduce
    python benchmarks/flag_numerics.py --values default eltwise,reduce --json

For each value, two fresh processes (XLA reads its flags once): ResNet-8 and Plain-8, one forward/backward
on one device (``_model_runs``), and the 2-device synchronised-BN script (``SYNC_SCRIPT``: one
forward/backward of a fixed batch, then three real train steps). Each tree is reduced to its worst element,
``|fast - flax| / max|flax leaf|`` (the fraction of the leaf's largest magnitude, as the test's tolerance is
written), and ``ok`` says whether every comparison is within the test's tolerance (``assert_trees_close``).
``default`` sets no YNN flag (XLA's own choice); resflax's defaults are off in the children
(``RESFLAX_XLA_DEFAULTS=0``), so the flag in each row is the only one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

VALUES = ["default", "eltwise", "reduce", "eltwise,reduce"]

SINGLE = """
import json, sys
sys.path.insert(0, sys.argv[1])
import numpy as np
import test_speed_numerics as t
out = {}
for name in ("resnet8", "plain8"):
    _, _, fast, ref = t._model_runs(name)
    for key in ("logits", "loss", "batch_stats", "grads", "eval_logits"):
        out[f"{name} {key}"] = [fast[key], ref[key]]
res = {}
for k, (a, d) in out.items():
    _, la, _ = t._leaves(a)
    _, ld, _ = t._leaves(d)
    worst = max(float(np.max(np.abs(x - y))) / max(float(np.max(np.abs(y))), 1e-30) for x, y in zip(la, ld))
    try:
        t.assert_trees_close(a, d, what=k)
        ok = True
    except AssertionError:
        ok = False
    res[k] = {"worst": worst, "ok": ok}
print(json.dumps(res))
"""


def _worst(actual: dict, desired: dict) -> tuple[float, bool]:
    import numpy as np  # noqa: PLC0415
    import test_speed_numerics as t  # noqa: PLC0415

    worst = max(float(np.max(np.abs(actual[p] - d))) / max(float(np.max(np.abs(d))), 1e-30)
                for p, d in desired.items())
    try:
        t.assert_trees_close(actual, desired)
        ok = True
    except AssertionError:
        ok = False
    return worst, ok


def _env(value: str, devices: int) -> dict:
    from resflax import xla  # noqa: PLC0415

    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}
    flags = [f"--xla_force_host_platform_device_count={devices}"] if devices > 1 else []
    if value != "default":
        flags.append(f"{xla.YNN_FLAG}={value}")
    env.update(JAX_PLATFORMS="cpu", RESFLAX_XLA_DEFAULTS="0", XLA_FLAGS=" ".join(flags))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
    return env


def measure(value: str, tmp: Path) -> dict:
    import numpy as np  # noqa: PLC0415
    import test_speed_numerics as t  # noqa: PLC0415

    res = subprocess.run([sys.executable, "-c", SINGLE, str(ROOT / "tests")], env=_env(value, 1),
                         capture_output=True, text=True, timeout=1200)
    if res.returncode != 0:
        raise SystemExit(f"{value}: single-device child failed:\n{res.stderr[-3000:]}")
    rows = json.loads(res.stdout.strip().splitlines()[-1])

    out = tmp / f"sync-{value.replace(',', '_')}.npz"
    res = subprocess.run([sys.executable, "-c", t.SYNC_SCRIPT, str(out)], env=_env(value, 2), capture_output=True,
                         text=True, timeout=1200)
    if res.returncode != 0:
        raise SystemExit(f"{value}: sync-BN child failed:\n{res.stderr[-3000:]}")
    paths = json.loads(res.stdout.strip().splitlines()[-1])
    arrays = np.load(out)

    def tree(impl, name):
        return {p: arrays[f"{impl}.{name}.{i}"] for i, p in enumerate(paths[impl][name])}

    for name in ("loss", "logits", "grads", "batch_stats", "step_losses", "step_params", "step_batch_stats"):
        worst, ok = _worst(tree("fast", name), tree("flax", name))
        rows[f"sync-BN 2 devices {name}"] = {"worst": worst, "ok": ok}
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--values", nargs="+", default=VALUES,
                   help="values of the YNN fusion flag; 'default' = no flag (XLA's own)")
    p.add_argument("--json", action="store_true", help="one JSON line per value")
    a = p.parse_args(argv)
    import jaxlib  # noqa: PLC0415

    from resflax import xla  # noqa: PLC0415

    cpu = xla.cpu_features()
    with tempfile.TemporaryDirectory(prefix="resflax-flag-numerics-") as d:
        for value in a.values:
            rows = measure(value, Path(d))
            worst = max(r["worst"] for r in rows.values())
            where = max(rows, key=lambda k: rows[k]["worst"])
            sync = {k: v for k, v in rows.items() if k.startswith("sync")}
            single = {k: v for k, v in rows.items() if not k.startswith("sync")}
            summary = {
                "value": value,
                "jaxlib": jaxlib.__version__,
                "python": platform.python_version(),
                "cpu_avx512_fp16": "avx512_fp16" in cpu,
                "ok": all(r["ok"] for r in rows.values()),
                "worst": worst,
                "worst_in": where,
                "worst_single_device": max(r["worst"] for r in single.values()),
                "worst_sync_bn": max(r["worst"] for r in sync.values()),
                "failing": sorted(k for k, r in rows.items() if not r["ok"]),
            }
            if a.json:
                print(json.dumps({**summary, "rows": rows}), flush=True)
            else:
                print(f"{value:>16s}  jaxlib {summary['jaxlib']}  ok={summary['ok']}  worst {worst:.2e} ({where}); "
                      f"single device {summary['worst_single_device']:.2e}, sync BN {summary['worst_sync_bn']:.2e}",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
