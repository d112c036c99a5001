"""The paper's ImageNet test protocols (Sec. 3.4) for a trained state: top-1 and top-5 error.

- ``center``: the centre ``size`` crop of the image resized to shorter side ``eval_resize`` (224 of 256);
  what training evaluates (``tasks.ImageNetTask.evaluate``).
- ``10crop``: shorter side ``eval_resize``; the four corner and the centre crops and their mirror images;
  the **softmax** scores of the ten averaged (as the paper; fb.resnet.torch sums logits instead).
- ``multiscale``: the whole image at shorter side s for s in ``scales`` (224, 256, 384, 480, 640), and its
  mirror image, through the network; the softmax scores averaged over scales and mirrors. The longer side is
  rounded to a multiple of 32 (``imagenet.full_image``) so that few distinct shapes are compiled; the
  per-pixel mean image does not apply to other sizes, so its per-channel average is subtracted. A ResNet is
  fully convolutional here, as the paper's test: global average pooling, then the FC layer, equals the FC
  layer as a 1x1 conv over the final feature map with its scores averaged over positions (both linear). A VGG
  is not: its features are average-pooled into 7x7 bins (torchvision's ``AdaptiveAvgPool2d``) and go through
  its FC layers once, whereas VGG's own dense evaluation (Simonyan & Zisserman, Sec. 3.2) runs the FC layers
  as 7x7 and 1x1 convs over every position of the feature map and averages the score map; the two agree
  only when the feature map is 7x7 (a 224 x 224 input).

Every validation image is used exactly once: process p of P takes images p, p + P, ...; the counts are
summed over processes and checked (``evaluators.metrics``). Each process runs its share on its first local
device, image batches padded to a fixed size (``10crop``) so that one program serves every batch.
``ProtocolEvaluator`` is the evaluator (``train.evaluators``' interface) ``resflax eval --protocol`` runs.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from resflax.data import imagenet
from resflax.train import evaluators
from resflax.train.distributed import to_host

PROTOCOLS = ("center", "10crop", "multiscale")


def _probs_fn(model, std):
    @jax.jit
    def probs(variables, images_u8, mean):
        x = images_u8.astype(jnp.float32) * (1 / 255) - mean
        if std is not None:
            x = x / std
        return jax.nn.softmax(model.apply(variables, x, train=False).astype(jnp.float32), axis=-1)

    return probs


def _topk_wrong(probs: np.ndarray, label: int, k: int) -> bool:
    # ties broken towards the lower class index, as argsort is stable on -probs
    return label not in np.argsort(-probs, kind="stable")[:k]


def _ordered(fn, items: Sequence, workers: int) -> Iterator:
    if workers <= 1:
        yield from map(fn, items)
        return
    with cf.ThreadPoolExecutor(workers) as pool:  # Pillow releases the GIL while decoding
        yield from pool.map(fn, items)


def run(protocol: str, model, variables, source, mean: np.ndarray, cfg: imagenet.Preprocess,
        scales: Sequence[int] = imagenet.MULTISCALE, batch_images: int = 25, workers: int | None = None,
        keep_probs: bool = False, std: np.ndarray | None = None) -> dict:
    """Top-1/top-5 error (%) of ``protocol`` over every image of ``source`` (``{"image": bytes, "label"}``),
    this process's share (``p, p + P, ...``) summed over processes. ``variables`` are host arrays;
    ``mean`` is the run's (per-pixel (H, W, 3) or per-channel (3,)), ``std`` its per-channel divisor if any
    (imported weights' normalisation). ``keep_probs``: also return this
    process's averaged scores by image index (for tests)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    device = jax.local_devices()[0]
    variables = jax.device_put(variables, device)
    probs_fn = _probs_fn(model, None if std is None else np.asarray(std, np.float32))
    workers = workers or min(8, os.cpu_count() or 1)
    indices = list(range(jax.process_index(), len(source), jax.process_count()))
    errors = np.zeros(2, np.float64)
    kept = {}

    def done(i: int, label: int, p: np.ndarray) -> None:
        errors[0] += _topk_wrong(p, label, 1)
        errors[1] += _topk_wrong(p, label, min(5, p.shape[-1]))
        if keep_probs:
            kept[i] = p

    if protocol == "multiscale":
        flat_mean = jax.device_put(np.asarray(mean, np.float32).reshape(-1, 3).mean(0), device)

        def load(i):
            ex = source[i]
            views = []
            for s in scales:
                im = imagenet.full_image(ex["image"], s, cfg=cfg)
                views.append(np.stack([im, im[:, ::-1]]))
            return i, int(ex["label"]), views

        for i, label, views in _ordered(load, indices, workers):
            p = np.mean([np.asarray(probs_fn(variables, v, flat_mean)) for v in views], axis=(0, 1))
            done(i, label, p)
    else:
        m = jax.device_put(np.asarray(mean, np.float32), device)
        crops = 10 if protocol == "10crop" else 1

        def load(i):
            ex = source[i]
            c = imagenet.ten_crops(ex["image"], cfg) if crops == 10 else imagenet.eval_crop(ex["image"], cfg)[None]
            return i, int(ex["label"]), c

        batch: list = []

        def flush():
            x = np.concatenate([c for _, _, c in batch])
            pad = batch_images * crops - len(x)
            if pad:  # one program for every batch: pad, then drop the padding's scores
                x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
            p = np.asarray(probs_fn(variables, x, m))[: len(batch) * crops]
            for j, (i, label, _) in enumerate(batch):
                done(i, label, p[j * crops:(j + 1) * crops].mean(0))
            batch.clear()

        for item in _ordered(load, indices, workers):
            batch.append(item)
            if len(batch) == batch_images:
                flush()
        if batch:
            flush()
    counts = np.array([errors[0], errors[1], len(indices)], np.float64)
    if jax.process_count() > 1:
        counts = np.asarray(multihost_utils.process_allgather(counts)).reshape(-1, 3).sum(0)
    m = evaluators.metrics({"errors": counts[0], "errors5": counts[1], "count": counts[2]}, len(source),
                           f"protocol {protocol}")
    out = {"protocol": protocol, "top1_error": m["error"], "top5_error": m["top5_error"], "count": m["count"]}
    if keep_probs:
        out["probs"] = kept
    return out


class ProtocolEvaluator:
    """``protocol`` over every image of ``source`` as an evaluator: ``run(state_or_variables) -> {"error",
    "top5_error", "count"}`` (``run``'s arguments otherwise)."""

    def __init__(self, protocol: str, model, source, mean: np.ndarray, cfg: imagenet.Preprocess,
                 scales: Sequence[int] = imagenet.MULTISCALE, std: np.ndarray | None = None):
        self.protocol, self.model, self.source, self.mean, self.cfg = protocol, model, source, mean, cfg
        self.scales, self.std = scales, std

    def run(self, state_or_variables) -> dict[str, float]:
        params, batch_stats = evaluators.variables(state_or_variables)
        host = to_host({"params": params, "batch_stats": batch_stats})
        q = run(self.protocol, self.model, host, self.source, self.mean, self.cfg, scales=self.scales, std=self.std)
        return {"error": q["top1_error"], "top5_error": q["top5_error"], "count": q["count"]}
