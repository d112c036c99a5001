"""The PyTorch reference trained with the paper's CIFAR-10 recipe on the same data, as a run directory that
``resflax report --reference`` puts beside resflax's runs (Table 6's reference column, Fig. 6 curves).

    python benchmarks/torch_train_check.py --model resnet20 --scale 1.0 --device cuda --workdir runs/torch-resnet20
    python benchmarks/torch_train_check.py --model resnet56 --steps 640 --scale 0.01      # a CPU-sized check

Trains ``benchmarks/torch_reference.py``'s network on CIFAR-10 decoded by resflax's own loader, with the recipe
of ``experiments/cifar10.py:MODEL,schedule_scale=S``: batch 128, SGD momentum 0.9, weight decay 1e-4 on every
parameter, lr 0.1 divided by 10 at 32k*S and 48k*S, 64k*S steps; per-pixel mean, 4-pixel zero padding + random
crop + flip (drawn with numpy from ``--seed``: the same recipe, not the same random numbers as resflax; for
step-for-step parity from identical batches see ``benchmarks/train_parity.py``). Writes ``config.json`` and
``metrics.jsonl`` (training error every 50 steps, test error every ``--eval_every`` steps and at the end) in
resflax's format, with ``"framework": "pytorch"``. Needs the ``torch`` extra.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from torch_reference import build_model  # noqa: E402

from resflax.data import cifar10  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet56")
    ap.add_argument("--steps", type=int, default=None, help="stop early (default: the scaled schedule's end)")
    ap.add_argument("--scale", type=float, default=0.01, help="schedule_scale (1.0 = the paper's 64k)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data_dir", default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--eval_every", type=int, default=0, help="test error every N steps (0: every epoch, 390)")
    ap.add_argument("--workdir", default=None, help="write config.json + metrics.jsonl here (a run directory)")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    rs = np.random.RandomState(args.seed)
    dev = torch.device(args.device)
    data = cifar10.load(args.data_dir)
    mean = data.mean.transpose(2, 0, 1)[None]
    train_x = data.train.images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0 - mean
    test_x = torch.from_numpy(data.test.images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0 - mean).to(dev)
    test_y = torch.from_numpy(data.test.labels.astype(np.int64)).to(dev)
    model, _, _ = build_model(args.model)
    model = model.to(dev, memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    total = max(1, round(64_000 * args.scale))
    bounds = [max(1, round(32_000 * args.scale)), max(1, round(48_000 * args.scale))]
    steps = min(args.steps or total, total)
    n, b = len(train_x), 128
    eval_every = args.eval_every or n // b
    out = Path(args.workdir) if args.workdir else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps({
            "model": args.model, "seed": args.seed, "framework": "pytorch", "torch": torch.__version__,
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "dataset": "cifar10",
            "data_dir": args.data_dir, "batch_size": b, "num_steps": 64_000, "lr_boundaries": [32_000, 48_000],
            "schedule_scale": args.scale, "base_lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4}, indent=2))
        (out / "metrics.jsonl").write_text("")

    def emit(rec):
        print(json.dumps(rec), flush=True)
        if out is not None:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")

    def test_error() -> float:
        model.eval()
        wrong = 0
        with torch.no_grad():
            for s in range(0, len(test_y), 500):
                xb = test_x[s : s + 500].contiguous(memory_format=torch.channels_last)
                wrong += int((model(xb).argmax(1) != test_y[s : s + 500]).sum())
        model.train()
        return 100 * wrong / len(test_y)

    perm, pos, window = rs.permutation(n), 0, []
    t0 = time.time()
    model.train()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = 0.1 * 0.1 ** sum(step >= x for x in bounds)
        if pos + b > n:
            perm, pos = rs.permutation(n), 0
        idx = perm[pos : pos + b]
        pos += b
        x = np.pad(train_x[idx], ((0, 0), (0, 0), (4, 4), (4, 4)))
        off = rs.randint(0, 9, (b, 2))
        x = np.stack([x[i, :, r : r + 32, c : c + 32] for i, (r, c) in enumerate(off)])
        flip = rs.rand(b) < 0.5
        x[flip] = x[flip][..., ::-1]
        xt = torch.from_numpy(np.ascontiguousarray(x)).to(dev, non_blocking=True)
        xt = xt.contiguous(memory_format=torch.channels_last)
        yt = torch.from_numpy(data.train.labels[idx].astype(np.int64)).to(dev, non_blocking=True)
        logits = model(xt)
        loss = torch.nn.functional.cross_entropy(logits, yt)
        opt.zero_grad()
        loss.backward()
        opt.step()
        window.append((logits.argmax(1) != yt).float().mean())
        done = step + 1
        if done % 50 == 0 or done == steps:
            emit({"step": done, "split": "train", "error": 100 * float(torch.stack(window).mean()),
                  "loss": float(loss.detach()), "lr": opt.param_groups[0]["lr"], "epoch": done * b / n,
                  "img_per_s": done * b / (time.time() - t0)})
            window = []
        if done % eval_every == 0 or done == steps:
            emit({"step": done, "split": "test", "error": test_error(), "epoch": done * b / n})
    print(f"{args.model} (PyTorch reference) on {args.device}: {steps} steps in {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
