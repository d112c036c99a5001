"""Host input throughput of the ImageNet preprocessing (``resflax.data.imagenet``), on real JPEGs.

The images are scikit-image's sample photographs, cut at random and encoded as JPEG (quality 85-95) at an
ImageNet-typical 500×375 (a quarter portrait 375×500) and at a larger 1024×768, where DCT-domain downscaling
applies (the 256 eval resize always, the 256-480 training scale for S <= 384). ``--images`` of them, each
variant reading all of them once a round.

Single-process variants measure what a loader worker computes per image: the paper's training augmentation
and the random-resized crop (uint8 crop + lighting offset, ``imagenet.train_crop``) and the eval crop, with the
decoder's DCT downscaling ("draft") on and off; a plain full decode as the reference; and, once, the training
image finished to float32 on the host (``train_example``). They run one after another within each round, over
``--rounds`` rounds, so that on a shared machine every variant sees the same load; img/s is the median
round's, per process (wall clock); img/s per core divides by the CPU seconds the process used, and is the best
round's: on a shared machine contention also inflates CPU seconds (caches, memory bandwidth), only upwards.

Then grain (``imagenet_input.loader``: ``MapDataset`` -> ``mp_prefetch``) against the bare loop
(``bare_train_batches``: a spawned ``multiprocessing.Pool``) computing the same batches with the same worker
count, interleaved round by round, with a third loader, the design not taken, whose workers ship float32
images finished on the host instead of uint8 crops (4x the bytes). The first batch (worker start-up) is not
timed. Their img/s per core counts the CPU seconds of the main process and of every worker. Batches the workers
had already finished when the first one arrived (at most workers x buffer for grain, workers for the pool) are
counted without their CPU: with the default 40 steps that flatters img/s per core by at most ~10% (grain) and
~5% (pool).

    python benchmarks/input_throughput.py --images 200 --rounds 5 --workers 2
    python benchmarks/input_throughput.py --json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time

import grain
import numpy as np
from PIL import Image

from resflax.data import imagenet, imagenet_input, jpeg, sharding

GOAL_PER_CORE = 400  # training images/s per core (issue 10)


def _photos() -> list[np.ndarray]:
    import skimage.data as d  # noqa: PLC0415 (test/bench-only dependency)

    left, right = d.stereo_motorcycle()[:2]
    return [d.coffee(), d.chelsea(), d.rocket(), d.astronaut(), left, right, d.hubble_deep_field(),
            d.immunohistochemistry()]


def make_jpegs(n: int, size: tuple[int, int], seed: int = 0) -> list[bytes]:
    """``n`` JPEGs of ``size`` (landscape; every fourth portrait) cut at random from the sample photos."""
    photos, rng, out = _photos(), np.random.default_rng(seed), []
    for i in range(n):
        p = photos[i % len(photos)]
        w, h = size if i % 4 else size[::-1]
        ph, pw = p.shape[:2]
        frac = rng.uniform(0.6, 1.0)  # a window of the target aspect covering 60-100% of the fitting one
        cw = int(min(pw, ph * w / h) * frac)
        ch = int(cw * h / w)
        top, left_ = int(rng.integers(0, ph - ch + 1)), int(rng.integers(0, pw - cw + 1))
        im = Image.fromarray(p[top:top + ch, left_:left_ + cw]).resize((w, h), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=int(rng.integers(85, 96)))
        out.append(buf.getvalue())
    return out


def _decode_full(data: bytes) -> np.ndarray:
    im = jpeg.open_image(data)
    im.load()
    return np.asarray(im)


TRAIN = "train, paper scale aug (uint8 crop + lighting)"
DECODE = "decode full (reference)"


def single_process_variants(mean: np.ndarray) -> dict:
    """(name, draft) -> fn(data, index): what one worker computes per image."""
    out = {(DECODE, False): lambda d, i: _decode_full(d)}
    for draft in (True, False):
        paper = imagenet.Preprocess(draft=draft)
        incep = imagenet.Preprocess(crop="inception", draft=draft)
        out[(TRAIN, draft)] = lambda d, i, c=paper: imagenet.train_crop(d, 0, 0, i, c)
        out[("train, random-resized crop", draft)] = lambda d, i, c=incep: imagenet.train_crop(d, 0, 0, i, c)
        out[("eval, 256 resize + centre 224 (uint8)", draft)] = lambda d, i, c=paper: imagenet.eval_crop(d, c)
    out[("train, paper + float32 finish on host", True)] = lambda d, i: imagenet.train_example(d, mean, 0, 0, i)
    return out


class FinishedInWorker(imagenet_input.TrainExample):
    """The design not taken: float32 finished in the workers, 4x the bytes to move out of them."""

    def __call__(self, slot: int) -> dict:
        ex = super().__call__(slot)
        return {"image": imagenet.finish(ex["image"], imagenet.channel_mean(), ex["lighting"]), "label": ex["label"]}


def _child_cpu_s() -> float:
    total = 0.0
    for p in multiprocessing.active_children():
        with contextlib.suppress(OSError, IndexError):
            fields = open(f"/proc/{p.pid}/stat").read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    return total


def _time_loader(make, steps: int, batch: int) -> tuple[float, float]:
    """(img/s, img/s per CPU-second) of an iterator of ``steps`` batches, from its first batch to its end."""
    it = make()
    try:
        next(it)  # start-up: spawning workers, first batch
        cpu0, child0, t0 = time.process_time(), _child_cpu_s(), time.perf_counter()
        for _ in range(steps - 1):  # up to the last batch but not StopIteration, which ends the pool before its
            b = next(it)  # workers' CPU time is read; they have nothing left to compute by then
            del b
        wall = time.perf_counter() - t0
        cpu = time.process_time() - cpu0 + _child_cpu_s() - child0
    finally:
        close = getattr(it, "close", None)
        if close:
            close()
    n = (steps - 1) * batch
    return n / wall, n / cpu


def run(args) -> dict:
    load_before = os.getloadavg()
    mean = imagenet.channel_mean()
    sets = {f"{w}x{h}": make_jpegs(args.images, (w, h)) for w, h in args.sizes}
    variants = single_process_variants(mean)
    samples = {(s, v): [] for s in sets for v in variants}
    order = [(s, v) for s in sets for v in variants]
    for r in range(args.rounds):
        for s, v in order[r % len(order):] + order[:r % len(order)]:  # rotated: no variant always runs first
            data, fn = sets[s], variants[v]
            cpu0, t0 = time.process_time(), time.perf_counter()
            for i, d in enumerate(data):
                fn(d, i)
            wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
            samples[(s, v)].append((len(data) / wall, len(data) / cpu))
    rows = []
    for (s, v), xs in samples.items():
        rows.append(dict(images=s, variant=v[0], draft=v[1], workers=0, img_s=statistics.median(x for x, _ in xs),
                         img_s_core=max(c for _, c in xs)))

    # grain against the bare loop, same function, same workers, interleaved.
    data = sets[f"{args.sizes[0][0]}x{args.sizes[0][1]}"]
    src = [{"image": d, "label": i % 1000} for i, d in enumerate(data)]
    stream = sharding.Stream(len(src), args.batch, seed=0)
    as_float = grain.MapDataset.range(args.steps * args.batch).map(FinishedInWorker(src, stream)).batch(args.batch)
    loaders = {
        "grain (MapDataset.mp_prefetch)": lambda: imagenet_input.loader(
            imagenet_input.train_dataset(src, stream, num_steps=args.steps), workers=args.workers),
        "bare loop (multiprocessing.Pool)": lambda: imagenet_input.bare_train_batches(
            src, stream, num_steps=args.steps, workers=args.workers),
        "grain, float32 finished in the workers": lambda: imagenet_input.loader(as_float, workers=args.workers),
    }
    timed = {k: [] for k in loaders}
    names = list(loaders)
    for r in range(args.rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            timed[k].append(_time_loader(loaders[k], args.steps, args.batch))
    for k, xs in timed.items():
        rows.append(dict(images=f"{args.sizes[0][0]}x{args.sizes[0][1]}", variant=f"train batches: {k}",
                         draft=True, workers=args.workers, img_s=statistics.median(x for x, _ in xs),
                         img_s_core=max(c for _, c in xs)))
    meta = dict(
        cpu=_cpu(), cpus=os.cpu_count(), python=platform.python_version(),
        pillow=Image.__version__, grain=_version("grain"), loadavg_before=[round(x, 2) for x in load_before],
        loadavg_after=[round(x, 2) for x in os.getloadavg()], images_per_set=args.images, rounds=args.rounds,
        batch=args.batch, steps=args.steps, command="python " + " ".join(sys.argv),
    )
    return dict(rows=rows, meta=meta)


def _version(pkg: str) -> str:
    from importlib.metadata import version  # noqa: PLC0415

    return version(pkg)


def _cpu() -> str:
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def table(result: dict) -> str:
    m = result["meta"]
    lines = [f"{m['cpu']}, {m['cpus']} cores; load average (1, 5, 15 min) {m['loadavg_before']} before, "
             f"{m['loadavg_after']} after; Pillow {m['pillow']}, grain {m['grain']}; {m['rounds']} rounds "
             f"(img/s: median; per core: best); `{m['command']}`", "",
             "| images | variant | DCT downscale | workers | img/s | img/s per core | per core / full decode's |",
             "|---|---|---|---|---|---|---|"]
    decode = {r["images"]: r["img_s_core"] for r in result["rows"] if r["variant"] == DECODE}
    for r in result["rows"]:  # the last column is a ratio, so less sensitive to the machine's load
        lines.append(f"| {r['images']} | {r['variant']} | {'on' if r['draft'] else 'off'} | {r['workers']} | "
                     f"{r['img_s']:.0f} | {r['img_s_core']:.0f} | {r['img_s_core'] / decode[r['images']]:.2f} |")
    train = next(r for r in result["rows"] if r["variant"] == TRAIN and r["draft"])
    verdict = "meets" if train["img_s_core"] >= GOAL_PER_CORE else "misses"
    lines += ["", f"Training augmentation ({train['images']}): {train['img_s_core']:.0f} img/s per core, "
              f"{verdict} the goal of {GOAL_PER_CORE}."]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=256, help="distinct JPEGs per size")
    p.add_argument("--sizes", default="500x375,1024x768", help="comma-separated WxH (the first: grain vs bare)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--workers", type=int, default=2, help="worker processes of grain and of the bare loop")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=40, help="batches per loader run (the first is not timed)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    args.sizes = [tuple(int(x) for x in s.split("x")) for s in args.sizes.split(",")]
    result = run(args)
    print(json.dumps(result) if args.json else table(result))


if __name__ == "__main__":
    main()
