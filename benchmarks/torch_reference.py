"""PyTorch reference implementation of the paper's ResNets, for throughput comparison.

This is a small, self-contained PyTorch re-implementation of the networks from
"Deep Residual Learning for Image Recognition" (He et al., 2015), written to be
architecturally identical to the Flax models in ``resflax`` so the two can be
timed side by side on the same machine:

* CIFAR-10 networks of depth 6n+2 (``resnet20``, ``resnet56``, ``plain20``, ...):
  3x3/16 stem, three stages of n basic blocks with 16/32/64 filters, option-A
  (parameter-free) shortcuts: stride-2 spatial subsampling ``x[:, :, ::2, ::2]``
  followed by zero channels appended *after* the real channels.  BatchNorm after
  every conv (eps 1e-5, momentum 0.1), ReLU after the addition, no conv biases,
  global average pool, fc-10.  ``plain*`` drops the shortcut entirely.
* ImageNet ``resnet18`` (basic blocks) and ``resnet50`` (bottleneck blocks with
  the stride on the *first* 1x1 conv, i.e. the paper's original "v1"), option-B
  shortcuts (1x1 conv + BN projection only where the shape changes), 7x7/2 stem
  with padding 3, 3x3/2 max pool with padding 1, fc-1000.

Usage::

    python benchmarks/torch_reference.py --check
    python benchmarks/torch_reference.py --model resnet20 --batch 128 --steps 10 --warmup 3 --json
    python benchmarks/torch_reference.py --model resnet20 --batch 128 --serve   # steps on request (stdin)

``make_torch_step(model_name, batch, threads)`` returns a zero-argument callable
performing one full SGD training step on a fixed synthetic batch; it is the hook
used for side-by-side benchmarks against the JAX implementation.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

BN_EPS = 1e-5
BN_MOMENTUM = 0.1  # PyTorch convention: new = (1 - m) * running + m * batch

# Expected trainable-parameter counts (asserted by --check).
EXPECTED_PARAMS = {
    "resnet20": 269_722,
    "resnet56": 853_018,
    "resnet110": 1_727_962,
    "resnet18": 11_689_512,
    "resnet50": 25_557_032,
}


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, padding=0, bias=False)


def _init_weights(model: nn.Module) -> None:
    """He (fan_out, ReLU) init for convs, BN gamma=1/beta=0, default-ish fc."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# ---------------------------------------------------------------------------
# CIFAR networks (depth 6n+2, option-A shortcuts)
# ---------------------------------------------------------------------------


class _OptionAShortcut(nn.Module):
    """Parameter-free shortcut: subsample spatially, append zero channels."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.stride = stride
        self.extra = cout - cin
        assert self.extra >= 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.extra:
            # F.pad pads the last dims first: (W_l, W_r, H_t, H_b, C_front, C_back).
            # Zeros go AFTER the real channels.
            x = F.pad(x, (0, 0, 0, 0, 0, self.extra))
        return x


class CifarBasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, residual: bool = True):
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = _bn(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = _bn(cout)
        self.residual = residual
        self.shortcut = _OptionAShortcut(cin, cout, stride) if residual else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.residual:
            out = out + self.shortcut(x)
        return F.relu(out)


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int = 10, residual: bool = True):
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR depth must be 6n+2 with n >= 1, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = _conv3x3(3, 16)
        self.bn1 = _bn(16)
        layers = []
        cin = 16
        for stage, width in enumerate((16, 32, 64)):
            for i in range(n):
                stride = 2 if (stage > 0 and i == 0) else 1
                layers.append(CifarBasicBlock(cin, width, stride, residual))
                cin = width
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


# ---------------------------------------------------------------------------
# ImageNet networks (option-B projection shortcuts)
# ---------------------------------------------------------------------------


def _projection(cin: int, cout: int, stride: int) -> nn.Module | None:
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(_conv1x1(cin, cout, stride), _bn(cout))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = _conv3x3(cin, width, stride)
        self.bn1 = _bn(width)
        self.conv2 = _conv3x3(width, cout)
        self.bn2 = _bn(cout)
        self.shortcut = _projection(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        sc = x if self.shortcut is None else self.shortcut(x)
        return F.relu(out + sc)


class Bottleneck(nn.Module):
    """Paper's original (v1) bottleneck: the stride sits on the first 1x1 conv."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = _conv1x1(cin, width, stride)
        self.bn1 = _bn(width)
        self.conv2 = _conv3x3(width, width)
        self.bn2 = _bn(width)
        self.conv3 = _conv1x1(width, cout)
        self.bn3 = _bn(cout)
        self.shortcut = _projection(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        sc = x if self.shortcut is None else self.shortcut(x)
        return F.relu(out + sc)


class ImageNetResNet(nn.Module):
    def __init__(self, block: type, blocks_per_stage: tuple[int, ...], num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = _bn(64)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        layers = []
        cin = 64
        for stage, (width, count) in enumerate(zip((64, 128, 256, 512), blocks_per_stage)):
            for i in range(count):
                stride = 2 if (stage > 0 and i == 0) else 1
                layers.append(block(cin, width, stride))
                cin = width * block.expansion
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layers(x)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


# ---------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------

_IMAGENET = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
    "resnet152": (Bottleneck, (3, 8, 36, 3)),
}


def build_model(name: str) -> tuple[nn.Module, int, int]:
    """Return (model, image_size, num_classes) for a model name."""
    if name in _IMAGENET:
        block, stages = _IMAGENET[name]
        return ImageNetResNet(block, stages, 1000), 224, 1000
    m = re.fullmatch(r"(resnet|plain)(\d+)", name)
    if m:
        depth = int(m.group(2))
        if (depth - 2) % 6 == 0 and depth >= 8:
            return CifarResNet(depth, 10, residual=(m.group(1) == "resnet")), 32, 10
    raise ValueError(
        f"unknown model {name!r}: expected resnet{{6n+2}} / plain{{6n+2}} (CIFAR) "
        f"or one of {sorted(_IMAGENET)} (ImageNet)"
    )


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------
# Training step
# ---------------------------------------------------------------------------


def make_torch_step(model_name: str, batch: int, threads: int | None = None) -> Callable[[], float]:
    """Build a zero-arg callable that runs ONE SGD training step and returns the loss.

    Forward in train mode, cross-entropy, backward, SGD(lr 0.1, momentum 0.9,
    weight_decay 1e-4), float32, channels_last, on a fixed synthetic batch.
    The callable blocks until the step is complete (``loss.item()`` forces it;
    on CPU PyTorch is synchronous anyway).
    """
    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, size, num_classes = build_model(model_name)
    model = model.to(dtype=torch.float32, memory_format=torch.channels_last)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, size, size, generator=gen, dtype=torch.float32)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, num_classes, (batch,), generator=gen)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        return loss.item()

    return step


def benchmark(model_name: str, batch: int, steps: int, warmup: int, threads: int | None) -> dict:
    step = make_torch_step(model_name, batch, threads)
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    return {
        "model": model_name,
        "batch": batch,
        "step_s": step_s,
        "images_per_s": batch / step_s,
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def check_param_counts(verbose: bool = True) -> bool:
    ok = True
    for name, expected in EXPECTED_PARAMS.items():
        got = count_params(build_model(name)[0])
        good = got == expected
        ok &= good
        if verbose:
            print(f"{name:10s} params={got:>12,d} expected={expected:>12,d} {'OK' if good else 'MISMATCH'}")
    # The plain variant uses option-A (parameter-free) shortcuts, so it must match.
    for depth in (20, 56, 110):
        got = count_params(build_model(f"plain{depth}")[0])
        good = got == EXPECTED_PARAMS[f"resnet{depth}"]
        ok &= good
        if verbose:
            print(f"plain{depth:<5d} params={got:>12,d} (same as resnet{depth}) {'OK' if good else 'MISMATCH'}")
    return ok


def serve(model_name: str, batch: int, threads: int | None, stdin=None, stdout=None) -> None:
    """Steps on request, for a benchmark in another process (another Python, say one without torch): prints
    one JSON line ``{"torch_version", "threads", "python"}`` once the step is built, then for every line ``N`` read
    from stdin runs N steps and prints ``{"times": [seconds of each step]}``; stops at end of input."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    step = make_torch_step(model_name, batch, threads)
    print(json.dumps({"torch_version": torch.__version__, "threads": torch.get_num_threads(),
                      "python": platform.python_version()}), file=stdout, flush=True)
    for line in stdin:
        times = []
        for _ in range(int(line)):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        print(json.dumps({"times": times}), file=stdout, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.add_argument("--check", action="store_true", help="print and assert parameter counts, then exit")
    p.add_argument("--serve", action="store_true", help="run steps on request from stdin (see serve())")
    args = p.parse_args(argv)

    if args.serve:
        serve(args.model, args.batch, args.threads)
        return 0

    if args.check:
        ok = check_param_counts()
        assert ok, "parameter count mismatch"
        print("all parameter counts OK")
        return 0

    if args.steps < 1:
        p.error("--steps must be >= 1")
    res = benchmark(args.model, args.batch, args.steps, args.warmup, args.threads)
    if args.json:
        print(json.dumps(res))
    else:
        print(
            f"{res['model']} batch={res['batch']} step={res['step_s'] * 1e3:.1f} ms "
            f"{res['images_per_s']:.1f} img/s (torch {res['torch_version']}, {res['threads']} threads)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
