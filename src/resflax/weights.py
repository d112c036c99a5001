"""Weights in and out in PyTorch's layouts: torchvision/timm ImageNet ResNets and VGGs, and the CIFAR ResNets of
akamaster/pytorch_resnet_cifar10. Pure numpy both ways, so that a round trip is bit-exact.

Layouts (``../shared/IMAGENET.md``'s traps, each handled here):

- conv weights OIHW <-> Flax HWIO; FC weights (out, in) <-> (in, out); BatchNorm ``weight``/``bias``/
  ``running_mean``/``running_var`` <-> ``scale``/``bias`` and ``batch_stats`` ``mean``/``var`` (PyTorch's
  running variance is used as stored: both frameworks normalise by it in eval mode); ``num_batches_tracked``
  is dropped on import and written as 0 on export.
- torchvision/timm ResNets are **v1.5** (stride on the bottleneck's 3x3, ``stride_on_3x3=True``). The paper's
  v1 (stride on the first 1x1) has the same names and shapes, so a file cannot tell which it is: v1 weights
  under these names (e.g. converted Caffe models) import into a v1 model (``stride_on_3x3=False``), v1.5 into
  a v1.5 one. Export refuses a v1 model (torchvision's class would load it silently and compute other
  activations). The stem and max-pool padding already equal PyTorch's ((3, 3) and (1, 1), -inf).
- shortcut options: a file's ``downsample`` (projection) weights must be on exactly the blocks where the model
  has projections (B: where the shape changes, torchvision's; C: every block; A: none), else refused naming
  the option the file holds, rather than dropping projections or leaving some untrained.
- torchvision's VGG flattens its 7x7x512 features in CHW order, resflax in HWC: ``classifier.0`` is permuted.
- akamaster's CIFAR ResNets: keys prefixed ``module.``, ``linear`` for the FC, option-A shortcuts with the
  zero channels split on both sides (``pad_layout="split"``).

Files: ``.safetensors`` are read and written with ``safetensors.numpy`` (no pickle, no torch). PyTorch
pickles (``.pth``/``.th``/``.pt``) are read only through ``torch.load(..., weights_only=True)``, PyTorch's
restricted unpickler that refuses to run code; it needs the ``torch`` extra, otherwise convert the file to
safetensors first. ``{"state_dict": ...}`` wrappers (akamaster's ``.th``) are unwrapped.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
from flax import traverse_util
from safetensors.numpy import load_file, save

from resflax.data.files import save_atomically
from resflax.errors import BadInput, DataError
from resflax.models.vgg import CONFIGS

LAYOUTS = ("torchvision", "cifar")


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """A state dict as numpy arrays from a ``.safetensors`` file or (with torch installed) a PyTorch file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"weights file {path} not found")
    if path.suffix == ".safetensors":
        try:
            return dict(load_file(str(path)))
        except Exception as e:  # noqa: BLE001
            raise DataError(f"{path} is not a readable safetensors file ({str(e).splitlines()[0]})") from e
    try:
        import torch  # noqa: PLC0415 (an optional extra, and heavy: only for PyTorch pickles)
    except ImportError:
        raise DataError(f"{path} is a PyTorch pickle: reading it safely needs torch (`pip install 'resflax[torch]'`), "
                        "or convert it to .safetensors first") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)  # restricted: never runs code
    except pickle.UnpicklingError as e:  # PyTorch's text would suggest weights_only=False: never ours to say
        raise DataError(_refused_pickle(path, str(e))) from None
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{path} could not be read as weights only ({str(e).splitlines()[0]})") from e
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise DataError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy() for k, v in obj.items()}


def _refused_pickle(path: Path, torch_text: str) -> str:
    """One line for a pickle that PyTorch's restricted unpickler refused: what was refused, and how a user who
    trusts the file converts it to safetensors (the only place where its code may run: their own command)."""
    found = re.search(r"GLOBAL:? ?([\w.]+)", torch_text)
    what = (f"Python objects other than tensors ({found.group(1)})" if found
            else "pickled data other than tensors (or is damaged)")
    out = path.with_suffix(".safetensors")
    recipe = (f"python -c \"import torch; from safetensors.torch import save_file; m = torch.load({str(path)!r}, "
              "weights_only=False); m = m.state_dict() if hasattr(m, 'state_dict') else m.get('state_dict', m); "
              f"save_file({{k: v.contiguous() for k, v in m.items()}}, {str(out)!r})\"")
    return (f"{path} was refused: it contains {what}, which resflax does not unpickle for safety (unpickling "
            f"can run code); only if you trust the file, convert it to safetensors with {recipe} and import {out}")


def write_state_dict(state: dict[str, np.ndarray], path: str | Path) -> None:
    """``state`` as a ``.safetensors`` file, written beside ``path`` and renamed into place: a file already at
    ``path`` stays whole until the new one is complete, whenever the writer is stopped."""
    # (np.ascontiguousarray would make 0-d arrays, e.g. num_batches_tracked, 1-d)
    data = save({k: np.require(v, requirements="C") for k, v in state.items()})
    save_atomically(path, lambda f: f.write(data))


# ---- the name maps: resflax path -> (torch key, kind) ------------------------------------------------------


def _bn(ours: str, theirs: str) -> list[tuple[str, str, str]]:
    return [(f"params/{ours}/scale", f"{theirs}.weight", "vec"), (f"params/{ours}/bias", f"{theirs}.bias", "vec"),
            (f"batch_stats/{ours}/mean", f"{theirs}.running_mean", "vec"),
            (f"batch_stats/{ours}/var", f"{theirs}.running_var", "vec")]


def _resnet_map(model, layout: str) -> list[tuple[str, str, str]]:
    pre = "module." if layout == "cifar" else ""
    out = [("params/stem_conv/kernel", f"{pre}conv1.weight", "conv"), *_bn("stem_bn", f"{pre}bn1")]
    convs = 3 if model.block == "bottleneck" else 2
    for i, n in enumerate(model.stage_sizes):
        for j in range(n):
            ours, theirs = f"stage{i + 1}/block{j}", f"{pre}layer{i + 1}.{j}"
            for k in range(1, convs + 1):
                out += [(f"params/{ours}/conv{k}/kernel", f"{theirs}.conv{k}.weight", "conv"),
                        *_bn(f"{ours}/bn{k}", f"{theirs}.bn{k}")]
            out.append((f"params/{ours}/shortcut/conv/kernel", f"{theirs}.downsample.0.weight", "conv"))
            out += _bn(f"{ours}/shortcut/bn", f"{theirs}.downsample.1")
    fc = f"{pre}linear" if layout == "cifar" else "fc"
    return out + [("params/fc/kernel", f"{fc}.weight", "fc"), ("params/fc/bias", f"{fc}.bias", "vec")]


def _vgg_map(model) -> list[tuple[str, str, str]]:
    out, idx, k = [], 0, 0
    for n in CONFIGS[model.depth]:
        for _ in range(n):
            out += [(f"params/conv{k}/kernel", f"features.{idx}.weight", "conv"),
                    (f"params/conv{k}/bias", f"features.{idx}.bias", "vec")]
            idx, k = idx + 2, k + 1  # conv, ReLU
        idx += 1  # max-pool
    for j, t in enumerate((0, 3, 6)):  # Linear, ReLU, Dropout, ...
        out += [(f"params/fc{j}/kernel", f"classifier.{t}.weight", "fc_chw" if j == 0 else "fc"),
                (f"params/fc{j}/bias", f"classifier.{t}.bias", "vec")]
    return out


def name_map(model, layout: str) -> list[tuple[str, str, str]]:
    """``(resflax path, torch key, kind)`` for every parameter and BN statistic of ``model`` that exists in it
    (shortcut projections only where the model has them)."""
    if layout not in LAYOUTS:
        raise BadInput(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if hasattr(model, "depth"):  # VGG
        if layout != "torchvision":
            raise BadInput("VGG weights use the torchvision layout")
        return _vgg_map(model)
    return _resnet_map(model, layout)


def _to_flax(a: np.ndarray, kind: str) -> np.ndarray:
    if kind == "conv":
        return a.transpose(2, 3, 1, 0)
    if kind == "fc":
        return a.T
    if kind == "fc_chw":  # (out, C*7*7) in CHW order -> (7*7*C in HWC order, out)
        o = a.shape[0]
        return a.reshape(o, -1, 7, 7).transpose(0, 2, 3, 1).reshape(o, -1).T
    return a


def _to_torch(a: np.ndarray, kind: str) -> np.ndarray:
    if kind == "conv":
        return a.transpose(3, 2, 0, 1)
    if kind == "fc":
        return a.T
    if kind == "fc_chw":
        o = a.shape[1]
        return a.T.reshape(o, 7, 7, -1).transpose(0, 3, 1, 2).reshape(o, -1)
    return a


def from_torch(state: dict[str, np.ndarray], model, abstract_variables: dict, layout: str) -> dict:
    """resflax variables (``{"params", "batch_stats"}``) from a PyTorch state dict, checked key by key and
    shape by shape against ``abstract_variables`` (``jax.eval_shape`` of ``model.init``)."""
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    target = traverse_util.flatten_dict(abstract_variables, sep="/")
    mapping = [m for m in name_map(model, layout) if m[0] in target]
    unmapped = sorted(set(target) - {m[0] for m in mapping})
    if unmapped:
        raise BadInput(f"resflax {unmapped[0]} has no {layout} counterpart ({len(unmapped)} such)")
    _check_shortcuts(state, model, mapping, layout)
    missing = [t for _, t, _ in mapping if t not in state]
    extra = sorted(set(state) - {t for _, t, _ in mapping})
    if missing or extra:
        parts = [f"{len(keys)} {what} (e.g. {keys[0]})" for what, keys in (("missing", missing),
                                                                            ("unexpected", extra)) if keys]
        raise BadInput(f"the weights do not fit this model ({', '.join(parts)}): another depth, shortcut "
                       "option or layout?")
    flat = {}
    for ours, theirs, kind in mapping:
        a = _to_flax(np.asarray(state[theirs], np.float32), kind)
        if a.shape != tuple(target[ours].shape):
            raise BadInput(f"{theirs} has shape {state[theirs].shape}, this model needs {target[ours].shape} "
                           f"at {ours} (number of classes, depth or width differ)")
        flat[ours] = a
    return traverse_util.unflatten_dict(flat, sep="/")


_PROJECTION = re.compile(r"^((?:module\.)?layer\d+\.\d+)\.downsample\.0\.weight$")
_BLOCK = re.compile(r"^((?:module\.)?layer\d+\.\d+)\.conv1\.weight$")


def _check_shortcuts(state: dict[str, np.ndarray], model, mapping: list[tuple[str, str, str]], layout: str) -> None:
    """``BadInput`` in one line when a ResNet file of the model's blocks has projection shortcuts (``downsample``)
    on other blocks than the model's shortcut option: option A would drop them, C would leave some untrained."""
    if not hasattr(model, "stage_sizes") or not getattr(model, "residual", True):
        return
    blocks = sorted({m.group(1) for k in state if (m := _BLOCK.match(k))})
    ours = sorted({m.group(1) for _, t, _ in mapping if (m := _BLOCK.match(t))})
    if blocks != ours:
        return  # another depth: from_torch names the missing and unexpected tensors
    theirs = {m.group(1) for k in state if (m := _PROJECTION.match(k))}
    wanted = {m.group(1) for _, t, _ in mapping if (m := _PROJECTION.match(t))}
    if theirs == wanted:
        return
    # B's projections: the first block of each stage whose shape changes (all but a basic-block first stage)
    first = {b for b in blocks if b.endswith(".0") and (model.block == "bottleneck" or not b.endswith("layer1.0"))}
    held = "A" if not theirs else "C" if len(theirs) == len(blocks) else "B" if theirs == first else None
    option = model.shortcut
    if option == "A":
        what = (f"its zero-padding identity has no projections and would drop the file's projection (downsample) "
                f"weights of {len(theirs)} of its {len(blocks)} blocks")
    else:
        lacking = sorted(wanted - theirs)
        what = (f"it has projection (downsample) weights on {len(wanted)} of the {len(blocks)} blocks, the file on "
                f"{len(theirs)}" + (f" (none for {lacking[0]})" if lacking else ""))
    hint = f"; the file holds shortcut {held}: import with --config.shortcut={held}" if held else ""
    raise BadInput(f"these {layout} weights cannot be a shortcut {option} network: {what}{hint}")


def to_torch(variables: dict, model, layout: str) -> dict[str, np.ndarray]:
    """A PyTorch state dict (numpy arrays) of ``variables`` in ``layout``; BN layers get ``num_batches_tracked``."""
    flat = traverse_util.flatten_dict(variables, sep="/")
    out = {}
    for ours, theirs, kind in name_map(model, layout):
        if ours in flat:
            out[theirs] = np.ascontiguousarray(_to_torch(np.asarray(flat[ours], np.float32), kind))
    for key in list(out):
        if key.endswith(".running_var"):
            out[re.sub(r"running_var$", "num_batches_tracked", key)] = np.zeros((), np.int64)
    return out


def check_variant(state: dict[str, np.ndarray], model, layout: str) -> None:
    """Refuses to export what the layout's own PyTorch classes would load silently and compute differently:
    torchvision's/timm's bottleneck ResNets are v1.5 (``stride_on_3x3=True``); akamaster's option A splits its
    zero channels (``pad_layout='split'``). (An import honours either choice: names and shapes cannot tell.)"""
    if layout == "torchvision" and getattr(model, "block", None) == "bottleneck" and not model.stride_on_3x3:
        raise BadInput("torchvision/timm ResNets are v1.5 (stride on the 3x3 conv) and this run is v1 "
                       "(stride_on_3x3=False): torchvision's class would load these weights silently and compute "
                       "other activations")
    if layout == "cifar" and getattr(model, "shortcut", "A") == "A" and model.pad_layout != "split":
        raise BadInput("akamaster's CIFAR ResNets pad option A's zero channels on both sides (pad_layout='split') "
                       "and this run appends them: its class would load these weights silently and compute other "
                       "activations")
