"""Step-time benchmark of resflax's real train/eval steps (``make_train_step`` / ``make_eval_step``).

Synthetic CIFAR-shaped (or ImageNet-shaped) uint8 data, warm-up excluded, median of ``--steps`` steps.
With ``--torch`` the PyTorch reference (``benchmarks/torch_reference.py``) is timed in the same process,
interleaved round by round with the JAX step, and the ratio resflax / PyTorch img/s is reported: on a shared,
noisy machine only such side-by-side ratios mean anything.

    python benchmarks/step_time.py --model resnet20 --batch 128 --torch --json
    python benchmarks/step_time.py --model resnet110 --batch 128 --mode eval --json
    python benchmarks/step_time.py --model resnet20 --batch 128 --devices 2 --json   # 2 CPU devices
    python benchmarks/step_time.py --model resnet20 --torch-python .venv/bin/python --json

``--torch-python PY`` runs the PyTorch reference in a child process of that interpreter instead (for a JAX
environment without torch, e.g. a newer Python): the same interleaving, each of its steps timed in the child
(``torch_reference.py --serve``), so the pipe between the two costs nothing measured.

``--vs-xla-flags FLAGS`` also runs the same step in a child process of this Python whose ``XLA_FLAGS`` are
exactly FLAGS (XLA reads its flags once per process), interleaved round by round with this one (and with
PyTorch): ``vs_speedup`` = this process's step time / the child's, a same-run A/B of an XLA flag.

    python benchmarks/step_time.py --model resnet56 --vs-xla-flags=--xla_cpu_experimental_ynn_fusion_type=eltwise,reduce

Options that must act before JAX starts (``--devices`` on CPU) are applied to ``XLA_FLAGS`` by appending;
flags a user already set are never replaced.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--devices", type=int, default=None, help="devices of the data mesh (CPU: fake host devices)")
    p.add_argument("--mode", default="train", choices=("train", "eval"))
    p.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    p.add_argument("--rounds", type=int, default=None, help="interleaving rounds with --torch (default: steps)")
    p.add_argument("--impl", default=None, choices=("fast", "flax"), help="model layer implementation")
    p.add_argument("--no-barriers", action="store_true", help="model without optimisation barriers")
    p.add_argument(
        "--scan-min-blocks",
        help="ResNet.scan_min_blocks (stages with at least this many blocks run as a lax.scan); 'none': unrolled",
    )
    p.add_argument("--torch", action="store_true", help="also time the PyTorch reference, interleaved")
    p.add_argument("--torch-python", default=None,
                   help="also time the PyTorch reference, interleaved, in a child process of this Python")
    p.add_argument("--torch-threads", type=int, default=None)
    p.add_argument("--vs-xla-flags", default=None, metavar="FLAGS",
                   help="also time the same step, interleaved, in a child process whose XLA_FLAGS are FLAGS")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the child of --vs-xla-flags
    p.add_argument("--json", action="store_true", help="print one JSON line")
    return p.parse_args(argv)


def _setup_env(args):
    if args.devices and args.devices > 1 and os.environ.get("JAX_PLATFORMS", "cpu") in ("", "cpu"):
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_force_host_platform_device_count" not in flags:
            os.environ["XLA_FLAGS"] = (flags + f" --xla_force_host_platform_device_count={args.devices}").strip()


def build(args):
    """Returns (step_fn, compile_s, meta): ``step_fn()`` runs one step and blocks until it is done."""
    import functools  # noqa: PLC0415

    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from resflax.models import get_model  # noqa: PLC0415
    from resflax.train import state as st  # noqa: PLC0415
    from resflax.train import step as sp  # noqa: PLC0415
    from resflax.train.evaluators import make_eval_step  # noqa: PLC0415

    overrides = {"dtype": jnp.bfloat16} if args.dtype == "bfloat16" else {}
    if args.impl:
        overrides["impl"] = args.impl
    if args.no_barriers:
        overrides["barriers"] = False
    if args.scan_min_blocks is not None:
        overrides["scan_min_blocks"] = None if args.scan_min_blocks == "none" else int(args.scan_min_blocks)
    mesh = sp.make_mesh(args.devices)
    probe = get_model(args.model, **overrides)
    if mesh.shape[sp.AXIS] > 1:
        overrides["bn_axis_name"] = sp.AXIS
    model = get_model(args.model, **overrides)
    size = 32 if probe.stem == "cifar" else 224
    shape = (size, size, 3)
    txf = functools.partial(st.make_optimizer, momentum=0.9, weight_decay=1e-4, weight_decay_on="all")
    state = st.init_state(model, txf, 0, shape, False)
    tx = txf(state.params)
    rs = np.random.RandomState(0)
    B = args.batch
    mean = np.full(shape, 0.5, np.float32)
    if args.mode == "train":
        n = max(2 * B, 1024) if size == 32 else 2 * B
        images = rs.randint(0, 256, (n, *shape)).astype(np.uint8)
        labels = rs.randint(0, model.num_classes, n).astype(np.int32)
        state = sp.replicate(state, mesh)
        images, labels, mean_r = sp.replicate((images, labels, mean), mesh)
        cfg = sp.step_config(
            (32000, 48000), batch_size=B, base_lr=0.1, factor=0.1, warmup_lr=0.01, warmup_until_error=0.8
        )
        fn = sp.make_train_step(model, tx, cfg, mesh)
        t0 = time.perf_counter()
        compiled = fn.lower(state, images, labels, mean_r).compile()
        compile_s = time.perf_counter() - t0
        box = [state]

        def step():
            box[0], m = compiled(box[0], images, labels, mean_r)
            jax.block_until_ready((box[0], m))

    else:
        from jax.sharding import NamedSharding  # noqa: PLC0415
        from jax.sharding import PartitionSpec as P  # noqa: PLC0415

        images = rs.randint(0, 256, (B, *shape)).astype(np.uint8)
        labels = rs.randint(0, model.num_classes, B).astype(np.int32)
        mask = np.ones((B,), bool)
        sh = NamedSharding(mesh, P(sp.AXIS))
        args_d = [jax.make_array_from_callback(a.shape, sh, lambda idx, a=a: a[idx]) for a in (images, labels, mask)]
        params, bstats, mean_r = sp.replicate((state.params, state.batch_stats, mean), mesh)
        fn = make_eval_step(model, mesh)
        t0 = time.perf_counter()
        compiled = fn.lower(params, bstats, *args_d, mean_r).compile()
        compile_s = time.perf_counter() - t0

        def step():
            jax.block_until_ready(compiled(params, bstats, *args_d, mean_r))

    meta = {
        "devices": int(mesh.shape[sp.AXIS]),
        "impl": model.impl,
        "barriers": model.barriers,
        "scan_min_blocks": model.scan_min_blocks,
        "platform": jax.devices()[0].platform,
    }
    return step, compile_s, meta


def _child(cmd: list[str], env: dict | None = None):
    """A process that steps on request (``--serve``: an info JSON line, then for each line ``N`` read, N
    steps and ``{"times": [...]}``): (steps(n) -> the n steps' seconds, info, close)."""
    import subprocess  # noqa: PLC0415

    child = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def reply() -> dict:
        line = child.stdout.readline()
        if not line:
            raise SystemExit(f"the child process ({' '.join(cmd)}) stopped (exit {child.wait()})")
        return json.loads(line)

    info = reply()

    def steps(n=1):
        child.stdin.write(f"{n}\n")
        child.stdin.flush()
        return reply()["times"]

    def close():
        child.stdin.close()
        child.wait(timeout=60)

    return steps, info, close


def _torch_child(args):
    """The PyTorch reference in a child process of ``args.torch_python`` (``torch_reference.py --serve``)."""
    here = os.path.dirname(os.path.abspath(__file__))
    cmd = [args.torch_python, os.path.join(here, "torch_reference.py"), "--serve", "--model", args.model,
           "--batch", str(args.batch)]
    if args.torch_threads:
        cmd += ["--threads", str(args.torch_threads)]
    return _child(cmd)


def _jax_child(args):
    """The same step in a child process of this Python with ``XLA_FLAGS=args.vs_xla_flags``."""
    cmd = [sys.executable, os.path.abspath(__file__), "--serve", "--model", args.model, "--batch", str(args.batch),
           "--dtype", args.dtype, "--mode", args.mode]
    if args.devices:
        cmd += ["--devices", str(args.devices)]
    if args.impl:
        cmd += ["--impl", args.impl]
    if args.no_barriers:
        cmd += ["--no-barriers"]
    if args.scan_min_blocks is not None:
        cmd += ["--scan-min-blocks", args.scan_min_blocks]
    return _child(cmd, dict(os.environ, XLA_FLAGS=args.vs_xla_flags))


def serve(args) -> None:
    """``--serve``: builds and compiles the step, prints ``{"compile_s", "xla_flags", "jaxlib"}``, then for each
    line ``N`` read from stdin runs N steps and prints ``{"times": [...]}``; stops at end of input."""
    _setup_env(args)
    import jaxlib  # noqa: PLC0415

    step, compile_s, _ = build(args)
    print(json.dumps({"compile_s": round(compile_s, 3), "xla_flags": os.environ.get("XLA_FLAGS", ""),
                      "jaxlib": jaxlib.__version__}), flush=True)
    for line in sys.stdin:
        times = []
        for _ in range(int(line)):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        print(json.dumps({"times": times}), flush=True)


def run(args) -> dict:
    _setup_env(args)
    import jax  # noqa: PLC0415
    import jaxlib  # noqa: PLC0415

    step, compile_s, meta = build(args)
    torch_step, torch_info, close = None, {}, None
    if args.torch or args.torch_python:
        if args.mode != "train":
            raise SystemExit("--torch compares training steps only (use --mode train)")
        if args.torch_python:
            torch_step, torch_info, close = _torch_child(args)
        else:
            sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
            import torch  # noqa: PLC0415
            from torch_reference import make_torch_step  # noqa: PLC0415

            one = make_torch_step(args.model, args.batch, args.torch_threads)
            torch_info = {"torch_version": torch.__version__, "threads": torch.get_num_threads(),
                          "python": platform.python_version()}

            def torch_step(n=1):
                times = []
                for _ in range(n):
                    t0 = time.perf_counter()
                    one()
                    times.append(time.perf_counter() - t0)
                return times

    vs_step, vs_info, vs_close = (None, {}, None) if args.vs_xla_flags is None else _jax_child(args)
    try:
        for _ in range(args.warmup):
            step()
            if vs_step:
                vs_step(1)
            if torch_step:
                torch_step(1)
        jt, tt, vt = [], [], []
        if torch_step is None and vs_step is None:
            for _ in range(args.steps):
                t0 = time.perf_counter()
                step()
                jt.append(time.perf_counter() - t0)
        else:
            rounds = args.rounds or args.steps
            per = max(1, args.steps // rounds)
            for _ in range(rounds):
                for _ in range(per):
                    t0 = time.perf_counter()
                    step()
                    jt.append(time.perf_counter() - t0)
                if vs_step:
                    vt += vs_step(per)
                if torch_step:
                    tt += torch_step(per)
    finally:
        for c in (close, vs_close):
            if c:
                c()
    step_s = statistics.median(jt)
    out = {
        "model": args.model,
        "batch": args.batch,
        "dtype": args.dtype,
        "mode": args.mode,
        **meta,
        "compile_s": round(compile_s, 3),
        "step_s": step_s,
        "images_per_s": args.batch / step_s,
        "steps": len(jt),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "python": platform.python_version(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "loadavg_1m": round(os.getloadavg()[0], 2),  # > cpus means other processes competed for the cores
    }
    if vs_step is not None:
        vs_s = statistics.median(vt)
        out.update(
            vs_xla_flags=vs_info["xla_flags"],
            vs_compile_s=vs_info["compile_s"],
            vs_step_s=vs_s,
            vs_images_per_s=args.batch / vs_s,
            vs_speedup=step_s / vs_s,
        )
    if torch_step is not None:
        torch_s = statistics.median(tt)
        out.update(
            torch_step_s=torch_s,
            torch_images_per_s=args.batch / torch_s,
            torch_version=torch_info["torch_version"],
            torch_threads=torch_info["threads"],
            torch_python=torch_info["python"],
            torch_process="child" if args.torch_python else "same",
            ratio=torch_s / step_s,
        )
        if vs_step is not None:
            out["vs_ratio"] = torch_s / out["vs_step_s"]
    return out


def main(argv=None) -> int:
    args = _parse(argv)
    if args.serve:
        serve(args)
        return 0
    out = run(args)
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:>20s}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
