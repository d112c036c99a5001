"""Throughput of a K-member population (``make_population_train_step``) against K sequential single runs.

Every configuration (the single run's ``make_train_step`` and each population of K members, vectorised with
``vmap`` or ``loop``) is built and compiled first (compile time recorded separately), then timed
interleaved: in each of ``--repeats`` rounds every population runs ``--steps`` steps right after a block of
``--steps`` single-run steps, each block timed between two ``block_until_ready``. Images/s of a population
is ``K * batch * steps / time``; its speed-up over K sequential runs is its images/s divided by the images/s
of the single-run block just before it (median over rounds). On a shared, noisy machine only such paired,
same-run ratios mean anything; process CPU seconds per step are recorded too (load-independent work).

    python benchmarks/population_throughput.py                       # ResNet-20, K = 1,2,4,8, vmap and loop
    python benchmarks/population_throughput.py --members 8 --vectorize vmap --steps 20 --repeats 5
    python benchmarks/population_throughput.py --mixed --json out.json --markdown

Synthetic CIFAR-shaped data (random uint8 images, random labels; the step draws and augments its batch
inside, as in training). Runs unchanged on CPU and GPU: prints the backend, the device kind and, where the
backend reports it (``device.memory_stats()``), the process's peak device memory; XLA's memory analysis of
each compiled step (arguments + outputs + temporaries) is reported on every backend. The accelerator goal
(issue): 8 ResNet-20 members at >= 5x the single run's images/s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

GOAL_MEMBERS, GOAL_RATIO = 8, 5.0


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--members", default="1,2,4,8", help="comma-separated population sizes K")
    p.add_argument("--vectorize", default="vmap,loop", help="comma-separated: vmap, loop")
    p.add_argument("--steps", type=int, default=5, help="timed steps per configuration and round")
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per configuration after compilation")
    p.add_argument("--examples", type=int, default=2560, help="size of the synthetic training split")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--mixed", action="store_true",
                   help="members half plain, half residual (residual flags: the first K//2 plain)")
    p.add_argument("--json", metavar="PATH", default=None, help="write the results as JSON ('-': stdout)")
    p.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = p.parse_args(argv)
    args.members = [int(k) for k in args.members.split(",") if k.strip()]
    args.vectorize = [v.strip() for v in args.vectorize.split(",") if v.strip()]
    for v in args.vectorize:
        if v not in ("vmap", "loop"):
            p.error(f"--vectorize: unknown mode {v!r}")
    if min(args.members) < 1 or args.steps < 1 or args.repeats < 1:
        p.error("--members, --steps and --repeats must be >= 1")
    return args


def residual_flags(k: int) -> list[bool]:
    """--mixed: the first K//2 members plain, the rest residual (K = 1: one residual member)."""
    return [i >= k // 2 for i in range(k)]


def _memory(compiled) -> dict:
    """XLA's memory analysis of a compiled step, in MiB (empty where the backend gives none)."""
    try:
        ma = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return {}
    if ma is None:
        return {}
    mib = 1 << 20
    out = {}
    for key in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes"):
        val = getattr(ma, key, None)
        if val is not None:
            out[key.replace("_size_in_bytes", "_mib")] = round(val / mib, 2)
    return out


def _peak_device_memory(device) -> float | None:
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - CPU devices raise or return None
        return None
    if not stats:
        return None
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else round(peak / (1 << 20), 1)


def build(args):
    """Returns (mesh, [config dicts]): each config holds a compiled step closure ``run(n)`` and its meta."""
    import functools  # noqa: PLC0415

    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from resflax.models import get_model  # noqa: PLC0415
    from resflax.train import state as st  # noqa: PLC0415
    from resflax.train import step as sp  # noqa: PLC0415

    overrides = {"dtype": jnp.bfloat16} if args.dtype == "bfloat16" else {}
    mesh = sp.make_mesh()
    if mesh.shape[sp.AXIS] > 1:
        overrides["bn_axis_name"] = sp.AXIS
    model = get_model(args.model, **overrides)
    if getattr(model, "stem", "cifar") != "cifar":
        raise SystemExit(f"{args.model}: this benchmark times the CIFAR step (32x32 inputs) only")
    if args.mixed and not getattr(model, "residual", False):
        raise SystemExit("--mixed needs a residual model (members differ by their shortcuts)")
    shape = (32, 32, 3)
    txf = functools.partial(st.make_optimizer, momentum=0.9, weight_decay=1e-4, weight_decay_on="all")
    cfg = sp.step_config((32000, 48000), batch_size=args.batch, base_lr=0.1, factor=0.1, warmup_lr=0.01,
                         warmup_until_error=0.8)

    rs = np.random.RandomState(0)
    n = max(args.examples, 2 * args.batch)
    images = rs.randint(0, 256, (n, *shape)).astype(np.uint8)
    labels = rs.randint(0, model.num_classes, n).astype(np.int32)
    mean = np.full(shape, 127.5, np.float32)
    images, labels, mean = sp.replicate((images, labels, mean), mesh)

    def init(seed, m=model):
        return st.init_state(m, txf, seed, shape, False)

    single_state = init(0)
    tx = txf(single_state.params)
    configs = []

    def add(name, k, vec, fn, state, extra_args):
        t0 = time.perf_counter()
        compiled = fn.lower(state, *extra_args, images, labels, mean).compile()
        compile_s = time.perf_counter() - t0
        box = [state]

        def run(steps):
            for _ in range(steps):
                box[0], metrics = compiled(box[0], *extra_args, images, labels, mean)
            jax.block_until_ready((box[0], metrics))

        configs.append({"name": name, "members": k, "vectorize": vec, "compile_s": compile_s, "run": run,
                        "memory": _memory(compiled)})
        print(f"compiled {name:>14s} in {compile_s:6.1f} s  {configs[-1]['memory']}", flush=True)

    add("single", 1, "-", sp.make_train_step(model, tx, cfg, mesh), sp.replicate(single_state, mesh), ())
    for k in args.members:
        flags = residual_flags(k) if args.mixed else None
        members = [init(i, model.clone(residual=flags[i]) if flags else model) for i in range(k)]
        stacked = jax.tree.map(lambda *a: jnp.stack(a), *members)
        alive = sp.replicate(np.ones((k,), bool), mesh)
        for vec in args.vectorize:
            fn = sp.make_population_train_step(model, tx, cfg, mesh, k, residual=flags, vectorize=vec)
            # each configuration owns its copy (the step donates its state)
            add(f"K={k} {vec}", k, vec, fn, sp.replicate(stacked, mesh), (alive,))
    return mesh, configs


def run(args) -> dict:
    from resflax import xla  # noqa: PLC0415

    xla.configure()  # resflax's default XLA flags, before JAX's backend starts (jax.devices() below)
    import jax  # noqa: PLC0415
    import jaxlib  # noqa: PLC0415

    dev = jax.devices()[0]
    print(f"backend {jax.default_backend()}, {jax.device_count()} device(s): {dev.device_kind}; "
          f"jax {jax.__version__}", flush=True)
    t_build = time.perf_counter()
    mesh, configs = build(args)
    build_s = time.perf_counter() - t_build
    if args.warmup:
        for c in configs:
            c["run"](args.warmup)
    times = {c["name"]: [] for c in configs}
    cpu = {c["name"]: [] for c in configs}
    ratios = {c["name"]: [] for c in configs}
    load = []

    def timed(c):
        t0, c0 = time.perf_counter(), time.process_time()
        c["run"](args.steps)
        t, ct = (time.perf_counter() - t0) / args.steps, (time.process_time() - c0) / args.steps
        times[c["name"]].append(t)
        cpu[c["name"]].append(ct)
        return t

    single, pops = configs[0], configs[1:]
    for r in range(args.repeats):
        # each population is timed right after a single-run block: the pair sees the same machine load
        for c in pops if r % 2 == 0 else pops[::-1]:  # alternate the order against drift
            t_single = timed(single)
            ratios[c["name"]].append(c["members"] * t_single / timed(c))
        load.append(os.getloadavg()[0])
        print(f"round {r + 1}/{args.repeats}: single {statistics.median(times['single'][-len(pops):]) * 1e3:.0f} ms, "
              + ", ".join(f"{c['name']} {times[c['name']][-1] * 1e3:.0f} ms" for c in pops), flush=True)

    rows = []
    for c in configs:
        t = times[c["name"]]
        k = c["members"]
        step_s = statistics.median(t)
        rat = ratios[c["name"]] or [1.0]
        rows.append({
            "config": c["name"],
            "members": k,
            "vectorize": c["vectorize"],
            "step_s": step_s,
            "cpu_s_per_step": statistics.median(cpu[c["name"]]),
            "images_per_s": k * args.batch / step_s,
            "ratio_vs_single": statistics.median(rat),  # paired: pop img/s / adjacent single img/s
            "ratio_min": min(rat),
            "ratio_max": max(rat),
            "compile_s": round(c["compile_s"], 2),
            **c["memory"],
        })
    out = {
        "model": args.model,
        "batch": args.batch,
        "dtype": args.dtype,
        "mixed": args.mixed,
        "steps": args.steps,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "backend": jax.default_backend(),
        "device_kind": dev.device_kind,
        "devices": int(mesh.shape["data"]),
        "peak_device_memory_mib": _peak_device_memory(dev),
        "build_and_compile_s": round(build_s, 1),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "loadavg_1m": [round(x, 2) for x in load],
        "rows": rows,
    }
    goal = [r for r in rows if r["members"] == GOAL_MEMBERS and r["vectorize"] != "-"]
    if goal:
        best = max(goal, key=lambda r: r["ratio_vs_single"])
        out["goal"] = {"members": GOAL_MEMBERS, "ratio": GOAL_RATIO, "best": best["config"],
                       "best_ratio": round(best["ratio_vs_single"], 3),
                       "met": best["ratio_vs_single"] >= GOAL_RATIO}
    return out


def markdown(out: dict) -> str:
    lines = [
        "| K | vectorize | img/s (median) | ratio vs single run, paired (min–max) | CPU s per member-step "
        "| compile s | XLA temp MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in out["rows"]:
        single = r["config"] == "single"
        k = "1 (single run)" if single else str(r["members"])
        ratio = "1" if single else f"{r['ratio_vs_single']:.2f}× ({r['ratio_min']:.2f}–{r['ratio_max']:.2f})"
        temp = f"{r['temp_mib']:.0f}" if "temp_mib" in r else ""
        cpu = r["cpu_s_per_step"] / r["members"]
        lines.append(f"| {k} | {r['vectorize']} | {r['images_per_s']:.0f} | {ratio} | {cpu:.2f} "
                     f"| {r['compile_s']:.1f} | {temp} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = _parse(argv)
    out = run(args)
    print(f"\n{out['model']} batch {out['batch']} {out['dtype']}{' mixed' if out['mixed'] else ''} on "
          f"{out['backend']} ({out['device_kind']}), {out['steps']} steps x {out['repeats']} rounds; "
          f"peak device memory: {out['peak_device_memory_mib'] or 'n/a'} MiB; load {out['loadavg_1m']}")
    for r in out["rows"]:
        print(f"{r['config']:>14s}: {r['images_per_s']:8.1f} img/s  x{r['ratio_vs_single']:.2f} "
              f"({r['ratio_min']:.2f}-{r['ratio_max']:.2f})  compile {r['compile_s']:.1f} s")
    if "goal" in out:
        g = out["goal"]
        print(f"goal: {g['members']} members >= {g['ratio']}x the single run: best {g['best']} "
              f"{g['best_ratio']}x -> {'met' if g['met'] else 'not met'}")
    if args.markdown:
        print("\n" + markdown(out))
    if args.json == "-":
        print(json.dumps(out))
    elif args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
