"""The paper's Fig. 7: the standard deviation of every 3x3 layer's response over the CIFAR-10 test set.

A response is a 3x3 convolution's output after BN and before the ReLU / addition, exactly what the model
sows into its ``intermediates`` collection (``stem_bn`` and ``stage{i}/block{j}/bn{k}``): no second model
definition. The std of a layer is taken over all its output values on the test images (images x positions
x channels), accumulated batch by batch in float64 (Chan et al.'s parallel mean/variance update), over
``train.evaluators``' padded, masked batches, its count checked as every evaluation's is: every image counts
exactly once.
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from resflax.analysis.runs import colour, family_depth, label, portable_path
from resflax.data import augment, cifar10
from resflax.data.files import cache_dir
from resflax.models import unpack_blocks
from resflax.train import evaluators
from resflax.train.evaluate import load_config, restore

_LAYER = re.compile(r"^stage(\d+)/block(\d+)/bn(\d+)$")
_LEAF = re.compile(r"stem_bn|bn\d+")


def layer_names(model, intermediates: dict[str, Any]) -> list[str]:
    """The sown names of ``model``'s 3x3 layers, in network order (stem first)."""
    names = []
    for name in _flatten(intermediates):
        if name == "stem_bn":
            if model.stem == "cifar":  # the ImageNet stem is 7x7
                names.append(name)
        elif m := _LAYER.match(name):
            if model.block == "basic" or m.group(3) == "2":  # a bottleneck's 3x3 is its second conv
                names.append(name)
    return sorted(names, key=_order)


def _order(name: str) -> tuple[int, ...]:
    """Network order of a layer name (numeric, so stage10 follows stage9)."""
    return (0, 0, 0) if name == "stem_bn" else tuple(int(g) for g in _LAYER.match(name).groups())


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"stage1/block0/bn1": array}``: sown values keyed by their BN layer's path (whatever suffix the sow
    name carries, e.g. ``bn1`` or ``bn1_out``)."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, tuple):  # sow appends to a tuple; one call per layer
            if m := _LEAF.search(k):
                out[prefix + m.group(0)] = v[-1]
        else:
            out.update(_flatten(v, prefix + k + "/"))
    return out


def make_stats_fn(model):
    """A jitted ``f(variables, images_u8, weights, mean) -> {layer: (count, mean, M2)}`` for one batch."""
    def f(variables, images, weights, mean):
        _, state = model.apply(variables, augment.normalize(images, mean), train=False, mutable=["intermediates"])
        flat = _flatten(state["intermediates"])
        w = weights.astype(jnp.float32)
        out = {}
        for name in layer_names(model, state["intermediates"]):
            y = flat[name].astype(jnp.float32)
            wb = w.reshape((-1,) + (1,) * (y.ndim - 1))
            n = jnp.sum(w) * (y.size // y.shape[0])
            m = jnp.sum(y * wb) / n
            out[name] = (n, m, jnp.sum(wb * jnp.square(y - m)))
        return out

    return jax.jit(f)


def response_stds(model, variables, images_u8: np.ndarray, mean: np.ndarray,
                  batch_size: int = 500) -> list[tuple[str, float]]:
    """``[(layer name, std)]`` of ``model``'s 3x3 layers over ``images_u8`` (N, 32, 32, 3 uint8), in order."""
    variables = unpack_blocks(model, variables)  # the unrolled call that sows per-layer outputs needs them
    stats_fn = make_stats_fn(model)
    batch_size = min(batch_size, len(images_u8))
    acc: dict[str, tuple[float, float, float]] = {}
    seen = 0
    for xb, mask in evaluators.padded(batch_size, images_u8):
        seen += int(mask.sum())
        for name, (nb, mb, m2b) in jax.device_get(stats_fn(variables, xb, mask.astype(np.float32), mean)).items():
            nb, mb, m2b = float(nb), float(mb), float(m2b)
            if name not in acc:
                acc[name] = (nb, mb, m2b)
                continue
            na, ma, m2a = acc[name]
            n, d = na + nb, mb - ma
            acc[name] = (n, ma + d * nb / n, m2a + m2b + d * d * na * nb / n)
    evaluators.check_count(seen, len(images_u8), "responses")
    # jit returns dicts with sorted keys: put the layers back in network order
    return [(name, float(np.sqrt(acc[name][2] / acc[name][0]))) for name in sorted(acc, key=_order)]


def run_responses(workdir: str | Path, data_dir: str | None = None, max_images: int | None = None,
                  batch_size: int = 500, _cache: dict | None = None) -> dict[str, Any]:
    """Fig. 7 data of the latest checkpoint of a run: ``{run, model, step, images, layers: [(name, std)]}``."""
    config = load_config(workdir)
    if data_dir:
        config.data_dir = data_dir
    config, run, state = restore(workdir, config, num_devices=1)
    cache = {} if _cache is None else _cache
    key = (run.data_dir, config.val_examples)
    if key not in cache:  # several runs usually share the data: decode it once
        cache[key] = cifar10.load(run.data_dir, config.val_examples, cache_dir(config))
    data = cache[key]
    images = data.test.images[:max_images] if max_images else data.test.images
    model = run.model.clone(bn_axis_name=None)  # eval mode never averages statistics across devices
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    return {"run": str(workdir), "model": config.model, "step": state.step,
            "images": len(images), "data_dir": data.data_dir,
            "layers": response_stds(model, variables, images, data.mean, batch_size)}


def write_csv(results: list[dict[str, Any]], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "model", "layer_index", "layer_name", "std"])
        for r in results:
            for i, (name, std) in enumerate(r["layers"], start=1):
                w.writerow([portable_path(r["run"]), r["model"], i, name, f"{std:.6g}"])


def plot_fig7(results: list[dict[str, Any]], path: Path) -> None:
    """Two panels like the paper's Fig. 7: stds in layer order, and sorted in descending order."""
    import matplotlib  # noqa: PLC0415 (pyplot only after the Agg backend is chosen)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 (after matplotlib.use)


    models = [r["model"] for r in results]
    fig, (a, b) = plt.subplots(2, 1, figsize=(7.5, 6.5))
    for r in results:
        fam, depth = family_depth(r["model"])
        stds = [s for _, s in r["layers"]]
        name = label(r["model"]) + (f" ({Path(r['run']).name})" if models.count(r["model"]) > 1 else "")
        style = dict(color=colour(depth), ls="--" if fam == "plain" else "-", lw=1.2, marker=".", ms=3, label=name)
        x = np.arange(1, len(stds) + 1)
        a.plot(x, stds, **style)
        b.plot(x, sorted(stds, reverse=True), **style)
    a.set(xlabel="layer index (original)", ylabel="std", title="std of 3x3 layer responses (after BN, before ReLU/add)")
    b.set(xlabel="layer index (sorted by magnitude)", ylabel="std")
    for ax in (a, b):
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def default_out(workdirs: list[str | Path]) -> Path:
    """Where ``resflax responses`` writes without ``--out``: ``DIR/responses`` for one run directory,
    ``responses`` under the runs' common parent directory for several (``runs/study/responses``)."""
    dirs = list(dict.fromkeys(os.path.abspath(w) for w in workdirs))
    if len(dirs) == 1:
        common = dirs[0]
    else:
        common = os.path.commonpath([os.path.dirname(d) for d in dirs])
    rel = os.path.relpath(common)  # shown as typed where it can be: relative under the current directory
    return Path(common if Path(rel).parts[0] == os.pardir else rel) / "responses"


def write_responses(results: list[dict[str, Any]], out: str | Path, command: str) -> dict[str, Path]:
    """Writes ``fig7.png``, ``responses.csv`` and ``responses.md`` into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"fig7": out / "fig7.png", "csv": out / "responses.csv", "md": out / "responses.md"}
    plot_fig7(results, paths["fig7"])
    write_csv(results, paths["csv"])
    lines = ["# Fig. 7: standard deviation of the 3x3 layers' responses\n",
             f"Generated by `{command}`; do not edit by hand. Response: a 3x3 conv's output after BN, before "
             "the ReLU/addition (the model's sown intermediates); std over all values (images x positions x "
             "channels) of the test images. Data: CIFAR-10 test split from TFDS data_dir "
             + ", ".join(sorted({portable_path(r["data_dir"]) for r in results})) + ".\n",
             "![fig7](fig7.png)\n", "| run | model | checkpoint step | images | 3x3 layers | mean std | max std |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        s = [v for _, v in r["layers"]]
        lines.append(f"| {portable_path(r['run'])} | {r['model']} | {r['step']:,} | {r['images']:,} | {len(s)} | "
                     f"{np.mean(s):.3f} | {np.max(s):.3f} |")
    paths["md"].write_text("\n".join(lines) + "\n")
    return paths
