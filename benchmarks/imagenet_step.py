"""ResNet-50 ImageNet train-step throughput: resflax (float32 and bfloat16, synthetic batches on the device, then
fed by the real grain loader) beside torchvision's ResNet-50 (channels_last, bf16 autocast, with and without
``torch.compile``), in one process so that the numbers share a machine.

    python benchmarks/imagenet_step.py --out docs/gpu-imagenet.json            # on a GPU host
    python benchmarks/imagenet_step.py --smoke                                 # CPU check of the script

The loader case needs a TFDS dataset of encoded images (``--data_dir``, ``--dataset``; ``resflax
make-tiny-imagenet --out DIR`` writes one) and measures the whole step: host decode and augmentation in
``--workers`` processes, transfer, and the step. The PyTorch cases need torch and torchvision (skipped with a
note when missing). Every number is images per second, median of ``--repeats`` timed windows.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np


def _time(fn, steps: int, repeats: int, sync) -> float:
    fn()
    sync()  # compile / warm up
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        sync()
        rates.append(steps / (time.perf_counter() - t0))
    return statistics.median(rates)


def resflax_cases(args) -> list[dict]:
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    from jax.sharding import NamedSharding  # noqa: PLC0415
    from jax.sharding import PartitionSpec as P  # noqa: PLC0415

    from resflax.data import imagenet  # noqa: PLC0415
    from resflax.models import get_model  # noqa: PLC0415
    from resflax.train import state as state_lib  # noqa: PLC0415
    from resflax.train import step as step_lib  # noqa: PLC0415

    mesh = step_lib.make_mesh()
    b, s = args.batch, args.size
    out = []
    for dtype in ("float32", "bfloat16"):
        model = get_model(args.model, dtype=getattr(jnp, dtype))
        tx_fn = functools.partial(state_lib.make_optimizer, momentum=0.9, weight_decay=1e-4, weight_decay_on="all")
        init = state_lib.init_state(model, tx_fn, 0, (s, s, 3), False)
        tx = tx_fn(init.params)
        cfg = step_lib.step_config((), batch_size=b, base_lr=0.1, factor=0.1, warmup_lr=0.01, warmup_until_error=0.8)
        step = step_lib.make_batch_train_step(
            model, tx, cfg, mesh, lambda im, m, li: imagenet.finish_batch(im, m, li, xp=jnp))
        state = [step_lib.replicate(init, mesh)]
        shard = NamedSharding(mesh, P(step_lib.AXIS))
        rng = np.random.default_rng(0)
        images = jax.device_put(rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8), shard)
        light = jax.device_put(np.zeros((b, 3), np.float32), shard)
        labels = jax.device_put(rng.integers(0, 1000, (b,)).astype(np.int32), shard)
        mean = step_lib.replicate(np.full((3,), 0.45, np.float32), mesh)

        def run(images=images, light=light, labels=labels, step=step, state=state, mean=mean):
            state[0], m = step(state[0], images, light, labels, mean, np.float32(1.0))
            return m

        def sync(state=state):
            jax.block_until_ready(state[0].params)

        ips = _time(run, args.steps, args.repeats, sync) * b
        out.append({"framework": "resflax", "case": f"{dtype}, synthetic on device", "img_per_s": ips})
        if dtype == "bfloat16" and args.data_dir:
            out.append(_loader_case(args, step, state, mean, mesh, sync))
    return out


def _loader_case(args, step, state, mean, mesh, sync) -> dict:
    import jax  # noqa: PLC0415
    from jax.sharding import NamedSharding  # noqa: PLC0415
    from jax.sharding import PartitionSpec as P  # noqa: PLC0415

    from resflax.data import imagenet, imagenet_input, imagenet_source  # noqa: PLC0415
    from resflax.data.sharding import Stream  # noqa: PLC0415
    from resflax.train import step as step_lib  # noqa: PLC0415

    src = imagenet_source.open_source(args.dataset, args.data_dir)
    cfg = imagenet.Preprocess(size=args.size, scale_range=(max(args.size, 256), 480))
    total = args.steps * (args.repeats + 1)
    ds = imagenet_input.train_dataset(src.train, Stream(len(src.train), args.batch, 0), total, cfg=cfg)
    it = imagenet_input.loader(ds, workers=args.workers)
    shard = NamedSharding(mesh, P(step_lib.AXIS))

    def run():
        bt = next(it)
        x = [jax.make_array_from_process_local_data(shard, np.ascontiguousarray(bt[k]))
             for k in ("image", "lighting", "label")]
        # labels of a small dataset index a 1000-class head: fine for timing
        state[0], m = step(state[0], *x, mean, np.float32(1.0))

    try:
        ips = _time(run, args.steps, args.repeats, sync) * args.batch
    finally:
        it.close()
    return {"framework": "resflax", "case": f"bfloat16, grain loader ({args.workers} workers, {src.name})",
            "img_per_s": ips}


def torch_cases(args) -> list[dict]:
    try:
        import torch  # noqa: PLC0415
        import torchvision  # noqa: PLC0415
    except ImportError as e:
        return [{"framework": "pytorch", "case": f"skipped: {e}", "img_per_s": None}]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    out = []
    for compiled in (False, True):
        if compiled and args.smoke:
            continue
        net = torchvision.models.resnet50().to(dev).to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        fwd = torch.compile(net) if compiled else net
        x = torch.randn(args.batch, 3, args.size, args.size, device=dev).to(memory_format=torch.channels_last)
        y = torch.randint(0, 1000, (args.batch,), device=dev)

        def run(fwd=fwd, opt=opt, x=x, y=y):
            opt.zero_grad(set_to_none=True)
            with torch.autocast(dev, dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(fwd(x), y)
            loss.backward()
            opt.step()

        def sync():
            if dev == "cuda":
                torch.cuda.synchronize()

        ips = _time(run, args.steps, args.repeats, sync) * args.batch
        out.append({"framework": "pytorch", "case": f"bf16 autocast, channels_last{', torch.compile' * compiled}",
                    "img_per_s": ips})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--data_dir", default=None)
    ap.add_argument("--dataset", default="resflax_tiny_jpeg")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: checks that the script runs (CPU)")
    ap.add_argument("--skip_torch", action="store_true")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args()
    if args.smoke:
        args.batch, args.size, args.steps, args.repeats, args.workers = 4, 64, 1, 1, 0
    rows = resflax_cases(args) + ([] if args.skip_torch else torch_cases(args))
    import jax  # noqa: PLC0415

    device = jax.devices()[0].device_kind
    print(f"{args.model} train step, batch {args.batch}, {args.size} px, on {device}")
    for r in rows:
        ips = f"{r['img_per_s']:10.1f}" if r["img_per_s"] else "         -"
        print(f"  {r['framework']:<8} {ips} img/s  {r['case']}")
    if args.out:
        Path(args.out).write_text(json.dumps({"device": device, "args": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
