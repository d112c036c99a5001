"""Sanity check of resflax's early training against the PyTorch reference on the same data and recipe.

    python benchmarks/torch_train_check.py --model resnet56 --steps 640 --scale 0.01

Trains ``benchmarks/torch_reference.py``'s network on CIFAR-10 (decoded by resflax's own loader) with the
paper's recipe scaled like ``experiments/cifar10.py:MODEL,schedule_scale=S`` (SGD 0.9, weight decay 1e-4 on every
parameter, lr 0.1 / 0.01 / 0.001, per-pixel mean, 4-pixel zero padding + random crop + flip, batch 128) and
prints the training error (percent, mean over each 50-step window) and the final test error, for comparison
with a resflax run's metrics.jsonl. Needs the ``torch`` extra.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from torch_reference import build_model  # noqa: E402

from resflax.data import cifar10  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet56")
    ap.add_argument("--steps", type=int, default=640)
    ap.add_argument("--scale", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data_dir", default=None)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    rs = np.random.RandomState(args.seed)
    data = cifar10.load(args.data_dir)
    mean = data.mean.transpose(2, 0, 1)[None]
    train_x = data.train.images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0 - mean
    test_x = data.test.images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0 - mean
    model, _, _ = build_model(args.model)
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    bounds = [round(32_000 * args.scale), round(48_000 * args.scale)]
    n, b = len(train_x), 128
    perm, pos, window = rs.permutation(n), 0, []
    for step in range(args.steps):
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
        xt = torch.from_numpy(np.ascontiguousarray(x)).to(memory_format=torch.channels_last)
        yt = torch.from_numpy(data.train.labels[idx].astype(np.int64))
        model.train()
        out = model(xt)
        loss = torch.nn.functional.cross_entropy(out, yt)
        opt.zero_grad()
        loss.backward()
        opt.step()
        window.append(float((out.argmax(1) != yt).float().mean()))
        if (step + 1) % 50 == 0 or step + 1 == args.steps:
            print(json.dumps({"step": step + 1, "split": "train", "error": 100 * float(np.mean(window)),
                              "lr": opt.param_groups[0]["lr"]}), flush=True)
            window = []
    model.eval()
    wrong = 0
    with torch.no_grad():
        for s in range(0, len(test_x), 500):
            out = model(torch.from_numpy(test_x[s : s + 500]).to(memory_format=torch.channels_last))
            wrong += int((out.argmax(1).numpy() != data.test.labels[s : s + 500]).sum())
    print(json.dumps({"step": args.steps, "split": "test", "error": 100 * wrong / len(test_x)}), flush=True)


if __name__ == "__main__":
    main()
