"""How much of a training step is convolution alone: XLA:CPU vs PyTorch on the exact convs of a CIFAR ResNet.

For every convolution of a CIFAR ResNet's train step (batch B, float32) this times, in isolation and
interleaved round by round in one process:

* resflax/XLA: the forward conv, the input gradient (as ``fastops`` computes it) and the weight gradient
  (``fastops.conv_weight_grad``: the layout transposes plus the canonical convolution, what XLA runs), each a
  separately jitted function on device-resident inputs;
* PyTorch (channels_last, the benchmark's reference): ``conv2d`` forward and ``aten.convolution_backward``
  for the input and weight gradients.

Summed over the network's convs, the XLA total is a floor under resflax's step time that no change to BN,
ReLU, layouts between layers or the step can remove; set against PyTorch's *whole* step (timed in the same
run) it says how far a given img/s ratio can go while XLA:CPU's convolution kernels stay what they are.

    python benchmarks/conv_floor.py --model resnet20 --batch 128 --json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


PAD = ((1, 1), (1, 1))


def conv_shapes(depth: int, batch: int):
    """``[(count, H, Cin, Cout, stride, needs_dx)]`` of a CIFAR ResNet-``depth`` (3x3 convs; option A)."""
    n = (depth - 2) // 6
    out = [(1, 32, 3, 16, 1, False)]  # stem: the image needs no gradient
    h, c = 32, 16
    for w, s in ((16, 1), (32, 2), (64, 2)):
        out.append((1, h, c, w, s, True))  # first conv of the stage
        h //= s
        out.append((2 * n - 1, h, w, w, 1, True))
        c = w
    return out


def _median_time(fn, rounds):
    fn()
    ts = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--step-rounds", type=int, default=6, help="rounds for the two whole steps")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)

    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import step_time  # noqa: PLC0415
    import torch  # noqa: PLC0415
    from torch_reference import make_torch_step  # noqa: PLC0415

    from resflax.models import fastops  # noqa: PLC0415

    depth = int(a.model.replace("resnet", ""))
    B = a.batch
    rows = []
    for count, h, cin, cout, s, needs_dx in conv_shapes(depth, B):
        key = jax.random.PRNGKey(0)
        x = jax.random.normal(key, (B, h, h, cin))
        w = jax.random.normal(key, (3, 3, cin, cout)) * 0.1
        g = jax.random.normal(key, (B, h // s, h // s, cout))
        fwd = jax.jit(lambda x, w, s=s: fastops._conv(x, w, (s, s), PAD))
        dw = jax.jit(lambda x, g, s=s, shape=w.shape: fastops.conv_weight_grad(x, g, shape, (s, s), PAD))
        # the input gradient the way fastops computes it: a forward conv with the flipped kernel (stride 1),
        # else autodiff's transposed convolution
        if s == 1:
            wt = jnp.flip(w, (0, 1)).swapaxes(2, 3)
            dx = jax.jit(lambda g, wt: fastops._conv(g, wt, (1, 1), PAD))
            dx_args = (g, wt)
        else:
            dx = jax.jit(lambda g, x=x, w=w, s=s: jax.vjp(lambda x_: fastops._conv(x_, w, (s, s), PAD), x)[1](g)[0])
            dx_args = (g,)
        xt = torch.randn(B, cin, h, h).to(memory_format=torch.channels_last)
        wt_ = (torch.randn(cout, cin, 3, 3) * 0.1).to(memory_format=torch.channels_last)
        gt = torch.randn(B, cout, h // s, h // s).to(memory_format=torch.channels_last)

        def t_fwd(xt=xt, wt_=wt_, s=s):
            torch.nn.functional.conv2d(xt, wt_, stride=s, padding=1)

        def t_bwd(mask, xt=xt, wt_=wt_, gt=gt, s=s):
            torch.ops.aten.convolution_backward(gt, xt, wt_, None, [s, s], [1, 1], [1, 1], False, [0, 0], 1, mask)

        jx = {
            "fwd": lambda fwd=fwd, x=x, w=w: fwd(x, w).block_until_ready(),
            "dx": lambda dx=dx, args=dx_args: dx(*args).block_until_ready(),
            "dw": lambda dw=dw, x=x, g=g: dw(x, g).block_until_ready(),
        }
        tx = {"fwd": t_fwd, "dx": lambda: t_bwd([True, False, False]), "dw": lambda: t_bwd([False, True, False])}
        if not needs_dx:
            jx.pop("dx")
            tx.pop("dx")
        row = {"count": count, "hw": h, "cin": cin, "cout": cout, "stride": s}
        for k in jx:
            row[f"xla_{k}_ms"] = 1e3 * _median_time(jx[k], a.rounds)
            row[f"torch_{k}_ms"] = 1e3 * _median_time(tx[k], a.rounds)
        rows.append(row)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}),
              file=sys.stderr, flush=True)

    def total(prefix):
        return sum(r["count"] * sum(v for k, v in r.items() if k.startswith(prefix) and k.endswith("_ms"))
                   for r in rows)

    # the two whole train steps, interleaved, for the same-run reference
    jstep, _, _ = step_time.build(step_time._parse(["--model", a.model, "--batch", str(B)]))
    tstep = make_torch_step(a.model, B, None)
    jstep()
    tstep()
    js, ts = [], []
    for _ in range(a.step_rounds):
        t0 = time.perf_counter()
        jstep()
        js.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        tstep()
        ts.append(time.perf_counter() - t0)
    out = {
        "model": a.model,
        "batch": B,
        "xla_conv_ms": round(total("xla_"), 1),
        "torch_conv_ms": round(total("torch_"), 1),
        "resflax_step_ms": round(1e3 * statistics.median(js), 1),
        "torch_step_ms": round(1e3 * statistics.median(ts), 1),
    }
    for part in ("fwd", "dx", "dw"):
        for fw in ("xla", "torch"):
            out[f"{fw}_{part}_ms"] = round(sum(r["count"] * r.get(f"{fw}_{part}_ms", 0.0) for r in rows), 1)
    out["xla_conv_share_of_resflax_step"] = round(out["xla_conv_ms"] / out["resflax_step_ms"], 3)
    out["xla_conv_over_torch_step"] = round(out["xla_conv_ms"] / out["torch_step_ms"], 3)
    out["best_ratio_if_all_else_were_free"] = round(out["torch_step_ms"] / out["xla_conv_ms"], 3)
    out.update(jax=jax.__version__, torch=torch.__version__, machine=f"{platform.machine()} {os.cpu_count()} cpus",
               loadavg_1m=round(os.getloadavg()[0], 2),
               command="python benchmarks/conv_floor.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    print(json.dumps(out) if a.json else "\n".join(f"{k:>36s}: {v}" for k, v in out.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
