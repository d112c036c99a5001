"""The config keys of every experiment, defined once, and the helpers experiment files use.

``KEYS`` is a table of ``Key`` specs: each key's default, help text, type, valid range or choices, whether a
resumption may change it (``resumable``) and, for a key added after runs already existed, the value an older
``config.json`` without it implicitly had (``added``). Everything else derives from it:

- ``build(experiment, **values)``: the ``ml_collections.ConfigDict`` of an experiment (its keys: the common
  ones and those ``only`` that experiment has), the table's defaults overridden by ``values``; the experiment
  files (``experiments/*.py``) call it with what differs;
- ``validate(config)``: every key's type, range and choices (``BadInput`` with one line);
- ``RESUMABLE_KEYS`` and ``ADDED_KEYS``, which ``train.workdir`` uses to tell a resumption from another
  experiment;
- ``resflax train --help``.

Adding a key is one entry here (plus the code that reads it). Importable without JAX: experiment files and
``train.workdir`` import it.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import ml_collections

from resflax.errors import BadInput

_NOT_ADDED = object()


@dataclasses.dataclass(frozen=True)
class Key:
    """One config key. ``name`` is dotted for a key of a group (``population.seeds``). ``default`` None makes
    a placeholder of ``type`` (None is then a valid value). ``ge``/``gt`` are lower bounds (of each element,
    for a tuple); ``length`` a tuple's length. ``only``: the experiment whose configs have the key (None:
    every experiment's). ``resumable``: a resumption may change it without becoming another experiment.
    ``added``: the key came after runs already existed, whose ``config.json`` lacks it and meant this value."""

    name: str
    default: Any
    help: str
    type: type = type(None)
    choices: tuple = ()
    ge: float | None = None
    gt: float | None = None
    length: int | None = None
    only: str | None = None
    resumable: bool = False
    added: Any = _NOT_ADDED

    def __post_init__(self):
        if self.type is type(None):
            if self.default is None:
                raise TypeError(f"config key {self.name}: a None default needs its type")
            object.__setattr__(self, "type", type(self.default))

    @property
    def nullable(self) -> bool:
        return self.default is None


EXPERIMENTS = {"cifar10": "experiments/cifar10.py", "imagenet": "experiments/imagenet.py"}
# The experiment files installed with resflax (src/resflax/experiments links to the checkout's experiments/)
SHIPPED = Path(__file__).resolve().parent / "experiments"


def experiment_path(spec: str) -> str:
    """The file a ``--config`` value ``PATH[:ARG]`` names: ``PATH`` itself when it exists; else, when it names
    a shipped experiment (``experiments/cifar10.py``, ``cifar10.py`` or ``cifar10``), the copy installed with
    resflax, so the documented commands work from any folder. Anything else is returned as given (and the
    config loader names it as missing)."""
    path, sep, arg = spec.partition(":")
    if not path or Path(path).expanduser().exists():
        return spec
    given = Path(path)
    name = given.name if given.suffix == ".py" else given.name + ".py"
    shipped = SHIPPED / name
    if given.parent in (Path("."), Path("experiments")) and shipped.is_file():
        return str(shipped) + sep + arg
    return spec
_RESUMABLE = dict(resumable=True)
_IMAGENET = dict(only="imagenet")

KEYS: dict[str, Key] = {k.name: k for k in [
    # ---- the model (ResNet fields that may be overridden, see resflax.models.ResNet)
    Key("model", "resnet20", "model name (resflax summary lists them)"),
    Key("shortcut", None, "A: zero-padding shortcuts; B: projections where the shape changes; C: projections "
        "everywhere; None: the model's own", str),
    Key("pad_layout", "append", 'option-A zero channels after the real ones (fb.resnet.torch); "split" = '
        "akamaster"),
    Key("stride_on_3x3", False, "False: v1 (the paper, stride on a bottleneck's first 1x1); True: v1.5 "
        "(torchvision's weights)"),
    Key("zero_init_last_bn", False, "initialise the last BN scale of each block to zero (off in the paper)"),
    Key("conv_init", "fan_in", 'ResNet conv kernels ~ N(0, 2/fan): "fan_in" (He et al. 2015 [13], forward '
        'signal), "fan_out" (the backward signal; fb.resnet.torch and torchvision)', choices=("fan_in", "fan_out"),
        added="fan_in"),
    Key("impl", None, 'layer implementation: "fast" (default) or "flax"', str),
    Key("scan_min_blocks", None, "stages with at least this many blocks run as one lax.scan (compile time flat "
        "in depth); None keeps the model's default (64: only ResNet-1202 scans), 0 unrolls every stage", int,
        ge=0),
    Key("dtype", "float32", 'compute dtype; "bfloat16" keeps float32 parameters and BN statistics',
        choices=("float32", "bfloat16")),
    Key("num_classes", None, "None: the dataset's", int, **_IMAGENET),

    # ---- data
    Key("dataset", "cifar10", "TFDS name: cifar10, or a dataset of encoded images with train/validation splits "
        "(imagenet2012, resflax_tiny_jpeg)"),
    Key("data_dir", None, "else $TFDS_DATA_DIR, ~/tensorflow_datasets", str, **_RESUMABLE),
    Key("val_examples", 0, "training images held out as a validation split (the plateau rule watches them); "
        "0 = none"),
    Key("crop", "scale", '"scale": the paper\'s [256, 480] scale augmentation; "inception": random-resized '
        "crop", **_IMAGENET),
    Key("scale_range", (256, 480), "shorter side before the crop, uniform, inclusive", **_IMAGENET),
    Key("image_size", 224, "crop side", gt=0, **_IMAGENET),
    Key("eval_resize", 256, "evaluation: shorter side (the longer one truncated, as torchvision's Resize), then the "
        "centre image_size crop (CenterCrop's offsets); imports record their source's (timm: image_size / crop_pct)",
        gt=0, **_IMAGENET),
    Key("flip", True, "random horizontal flip", **_IMAGENET),
    Key("lighting_std", 0.1, "AlexNet PCA lighting, alpha ~ N(0, lighting_std); 0 = off", ge=0, **_IMAGENET),
    Key("draft", True, "training crops only: let libjpeg decode at 1/2-1/8 scale, never below twice the crop's "
        "(evaluation always decodes in full)", **_IMAGENET),
    Key("resample", "bilinear", 'Pillow\'s antialiased filter for crops and evaluation: "bilinear" (torchvision\'s '
        'weights), "bicubic" (timm\'s usual), ...', choices=("bilinear", "bicubic", "nearest", "box", "hamming",
                                                            "lanczos"), **_IMAGENET),
    Key("mean", "pixel", 'input normalisation: "pixel" = the per-pixel training mean (the paper; ImageNet: of '
        'training crops, cached); "channel" = the per-channel mean channel_mean',
        choices=("pixel", "channel"), added="pixel"),
    Key("channel_mean", (0.485, 0.456, 0.406), 'the per-channel mean that mean="channel" subtracts (RGB, [0, 1] '
        "units); imports record their source's", ge=0, length=3, added=(0.485, 0.456, 0.406)),
    Key("multiscale_scales", (224, 256, 384, 480, 640), "resflax eval --protocol=multiscale: shorter sides of "
        "the multi-scale test (the paper's five)", **_IMAGENET, **_RESUMABLE),
    Key("std", None, "divide by this per-channel std after subtracting the mean: None (the paper); imports record "
        "their source's (torchvision's, akamaster's: (0.229, 0.224, 0.225), with mean=\"channel\")", tuple, gt=0,
        length=3, added=None),
    Key("mean_images", 10_000, "training images averaged for the per-pixel mean", gt=0, **_IMAGENET),
    Key("mean_cache_dir", None, "resflax's cache (decoded CIFAR-10, ImageNet means); None: "
        "$XDG_CACHE_HOME/resflax or ~/.cache/resflax", str, **_RESUMABLE),
    Key("loader_workers", -1, "grain worker processes per host; -1: one per core but one (<= 32)", ge=-1,
        **_IMAGENET, **_RESUMABLE),
    Key("loader_threads", 0, "extra reader threads per worker (Pillow releases the GIL)", ge=0, **_IMAGENET,
        **_RESUMABLE),

    # ---- optimisation
    Key("seed", 0, "fixes initialisation, data order and augmentation"),
    Key("batch_size", 128, "global batch, split over processes and devices", gt=0),
    Key("eval_batch_size", 500, "evaluation batch", gt=0, **_RESUMABLE),
    Key("schedule_scale", 1.0, "multiplies every step count of the schedule (num_steps, lr_boundaries, "
        "lr_warmup_steps); 1.0 = the paper's", gt=0),
    Key("num_steps", 64_000, "the end (before schedule_scale); smaller alone = stop early, boundaries unchanged",
        gt=0, **_RESUMABLE),
    Key("base_lr", 0.1, "learning rate (before lr_scaling)"),
    Key("lr_schedule", "fixed", '"fixed": drops at lr_boundaries; "plateau": drops when the held-out error '
        "stalls", choices=("fixed", "plateau"), **_IMAGENET),
    Key("lr_boundaries", (32_000, 48_000), "steps (before schedule_scale) where the lr is multiplied by "
        "lr_factor"),
    Key("lr_factor", 0.1, "multiplies the lr at each boundary (or plateau)"),
    Key("plateau_patience", 3, "evaluations without improvement before a drop", gt=0, **_IMAGENET),
    Key("plateau_min_delta", 0.1, "improvement (top-1 points) that counts", **_IMAGENET),
    Key("plateau_max_drops", 3, "at most this many drops", ge=0, **_IMAGENET),
    Key("lr_scaling", "none", '"linear": lr = base_lr * batch_size / lr_reference_batch',
        choices=("none", "linear"), **_IMAGENET),
    Key("lr_reference_batch", 256, "the batch base_lr is meant for (lr_scaling)", gt=0, **_IMAGENET),
    Key("lr_warmup_steps", 0, "gradual linear warm-up (steps, before schedule_scale); 0 = none", ge=0,
        **_IMAGENET),
    Key("momentum", 0.9, "SGD momentum"),
    Key("weight_decay", 1e-4, "L2 penalty"),
    Key("weight_decay_on", "all", 'or "kernels" (conv/fc kernels only)', choices=("all", "kernels")),
    Key("warmup", False, "the CIFAR ResNet-110/1202 rule: lr warmup_lr until the training error < "
        "warmup_until_error (ImageNet: see lr_warmup_steps)"),
    Key("warmup_lr", 0.01, "the lr while warmup is on"),
    Key("warmup_until_error", 0.8, "the (smoothed) training error, a fraction, that ends warmup"),

    # ---- population: several networks of one depth trained in one compiled program (train.population), one
    # per (residual flag, seed): e.g. --config.population.seeds=0,1,2,3,4 --config.population.residual=0,1
    # trains plain-n and ResNet-n (n from `model`) with 5 seeds each. Empty = one network (model, seed). Each
    # member gets its own run directory WORKDIR/members/<model>-seed<s> (eval, report, responses work on it,
    # or on WORKDIR for all members).
    Key("population.seeds", (), "one member per seed (and per residual flag); () = the config's seed alone",
        only="cifar10", added=()),
    Key("population.residual", (), "0 = plain, 1 = residual, 0,1 = both; () = the model's own kind",
        only="cifar10", added=()),
    Key("population.vectorize", "auto", '"loop" (each member bitwise its single run on the CPU), "vmap" (fast '
        'on GPU/TPU), "auto" (loop on the CPU, vmap elsewhere)', choices=("auto", "vmap", "loop"),
        only="cifar10", added="auto"),

    # ---- devices and processes
    Key("bn_group_size", 0, "BatchNorm statistics over groups of this many consecutive images of the global "
        "batch (ghost batch), the same on any device count; 0: over each device's slice (batch_size / devices: "
        "the paper's CIFAR-10 runs, 64 on each of two GPUs). ImageNet: 32 (the paper's 256 over 8 GPUs)", ge=0,
        added=0),
    Key("bn_sync", False, "True: BN statistics over the global batch, i.e. bn_group_size=batch_size (identical "
        "for any device count); False: as bn_group_size says"),
    Key("num_devices", 0, "devices to use; 0 = all", ge=0),
    # one process per host: "auto" lets JAX detect TPU pods/SLURM; or give the coordinator explicitly (also
    # from RESFLAX_COORDINATOR, RESFLAX_NUM_PROCESSES, RESFLAX_PROCESS_ID). Checked by train.distributed,
    # which reads the environment too.
    Key("distributed", None, 'multi-process: "auto" (JAX detects TPU pods/SLURM), "off", or None: one process '
        "unless coordinator_address is set", str, **_RESUMABLE),
    Key("coordinator_address", None, '"host:port" of process 0 (or $RESFLAX_COORDINATOR)', str, **_RESUMABLE),
    Key("num_processes", None, "processes in all, with coordinator_address (or $RESFLAX_NUM_PROCESSES)", int,
        **_RESUMABLE),
    Key("process_id", None, "this process's index, with coordinator_address (or $RESFLAX_PROCESS_ID)", int,
        **_RESUMABLE),
    Key("preemption_check_every_steps", 10, "several processes agree on a signal's stop step every N steps",
        gt=0, **_RESUMABLE),
    Key("peer_timeout_s", 30, "a process silent this long is dead: the others stop (exit 2) instead of "
        "hanging", gt=0, **_RESUMABLE),

    # ---- checkpoints and logs
    Key("checkpoint_every_steps", 1000, "also at the end and on SIGTERM/SIGINT", gt=0, **_RESUMABLE),
    Key("keep_checkpoints", 3, "the newest N are kept (>= 1)", gt=0, **_RESUMABLE),
    Key("eval_every_steps", 0, "test (and val) error every N steps; 0 = once per epoch", ge=0, **_RESUMABLE),
    Key("log_every_steps", 50, "a training record in metrics.jsonl / TensorBoard every N steps", gt=0,
        **_RESUMABLE),
    Key("progress", True, "tqdm progress bar", **_RESUMABLE),
]}


def user_cache_dir() -> Path:
    """The user's resflax cache folder (what ``mean_cache_dir=None`` means; internal errors of the commands that
    write no workdir keep their traceback in its ``errors/``): ``$XDG_CACHE_HOME/resflax`` or ``~/.cache/resflax``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "resflax"


def keys_of(experiment: str | None) -> list[Key]:
    """The keys of an experiment's configs (``EXPERIMENTS``), in the table's order; None: every key."""
    if experiment is not None and experiment not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {experiment!r}; known: {', '.join(EXPERIMENTS)}")
    return [k for k in KEYS.values() if experiment is None or k.only in (None, experiment)]


def _json(value: Any) -> Any:
    return json.loads(json.dumps(value))


# Config keys that may change between a run and its resumption without making it another experiment.
RESUMABLE_KEYS = frozenset(k.name for k in KEYS.values() if k.resumable)


def _added_keys() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in KEYS.values():
        if k.added is _NOT_ADDED:
            continue
        *groups, last = k.name.split(".")
        node = out
        for g in groups:
            node = node.setdefault(g, {})
        node[last] = _json(k.added)
    return out


# Keys added to the configs after runs were made: a config.json without one means its value here (as JSON; a
# group's keys, e.g. population's, came together and are compared as the group).
ADDED_KEYS = _added_keys()


def build(experiment: str, **values: Any) -> ml_collections.ConfigDict:
    """The ``ConfigDict`` of ``experiment``: its keys with the table's defaults, ``values`` (by key name,
    dotted for a group's key) overriding them. A None value (or default) is a placeholder of the key's type."""
    keys = keys_of(experiment)
    unknown = set(values) - {k.name for k in keys}
    if unknown:
        raise KeyError(f"{', '.join(sorted(unknown))}: not config keys of {experiment} (resflax.configs.KEYS)")
    c = ml_collections.ConfigDict()
    for k in keys:
        value = values.get(k.name, k.default)
        if value is None:
            value = ml_collections.config_dict.placeholder(k.type)
        elif k.type is float and type(value) is int:
            value = float(value)
        elif not isinstance(value, k.type) or (k.type is int and isinstance(value, bool)):
            raise TypeError(f"config key {k.name} is a {k.type.__name__}, got {value!r}")
        *groups, last = k.name.split(".")
        node = c
        for g in groups:
            if g not in node:
                node[g] = ml_collections.ConfigDict()
            node = node[g]
        node[last] = value
    return c


_WHAT = {bool: "True or False", int: "an integer", float: "a number", str: "a string", tuple: "a tuple"}


def _is(value: Any, kind: type) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind is tuple:
        return isinstance(value, tuple | list)  # a config.json's lists are tuples
    return isinstance(value, kind)


def _either(choices: tuple) -> str:
    words = [repr(c) for c in choices]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def check(name: str, value: Any) -> None:
    """Checks one key's value against its spec (``KEYS[name]``); raises ``BadInput`` with one line."""
    k = KEYS[name]
    if value is None:
        if k.nullable:
            return
        raise BadInput(f"{name} must be {_WHAT.get(k.type, k.type.__name__)}, got None")
    bound = f"> {k.gt}" if k.gt is not None else f">= {k.ge}" if k.ge is not None else ""
    if k.type is tuple:
        items = list(value) if _is(value, tuple) else None
        numbers = bound and items is not None and all(_is(v, float) for v in items)
        if items is None or (k.length is not None and len(items) != k.length) or (bound and not numbers) or (
                numbers and not all(_within(k, v) for v in items)):
            count = f"{k.length} " if k.length is not None else ""
            what = f"{count}numbers {bound}" if bound else f"a tuple{f' of {k.length}' if k.length else ''}"
            raise BadInput(f"{name} must be {what}{' or None' if k.nullable else ''}, got {value!r}")
        return
    if not _is(value, k.type):
        raise BadInput(f"{name} must be {_WHAT.get(k.type, k.type.__name__)}, got {value!r}")
    if k.choices and value not in k.choices:
        raise BadInput(f"{name} must be {_either(k.choices)}, got {value!r}")
    if bound and not _within(k, value):
        raise BadInput(f"{name} must be {'positive' if k.gt == 0 else bound}, got {value!r}")


def _within(k: Key, v: float) -> bool:
    return (k.gt is None or v > k.gt) and (k.ge is None or v >= k.ge)


def _lookup(config: Any, name: str) -> tuple[bool, Any]:
    node = config
    for part in name.split("."):
        if node is None or not hasattr(node, "get") or part not in node:
            return False, None
        node = node.get(part)
    return True, node


def validate(config: Any) -> None:
    """Checks every key of ``config`` that the table defines (type, range, choices); raises ``BadInput``.
    Keys the config lacks (an older ``config.json``) or the table does not know are left alone."""
    for name in KEYS:
        present, value = _lookup(config, name)
        if present:
            check(name, value)


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """Parses ``"resnet110,seed=3,val=5000"`` into a ConfigDict over ``defaults``.

    A bare first token sets the first default (the model name); ``key=value`` pairs are parsed as Python
    literals and must match the type of the default. Unknown keys raise ``ValueError``.
    """
    out = dict(defaults)
    first = next(iter(defaults)) if defaults else None
    for i, token in enumerate(t.strip() for t in (arg or "").split(",") if t.strip()):
        if "=" not in token:
            if i != 0 or first is None:
                raise ValueError(f"config argument {token!r} must be key=value")
            out[first] = token
            continue
        key, raw = (s.strip() for s in token.split("=", 1))
        if key not in defaults:
            raise ValueError(f"unknown config argument {key!r}; known: {', '.join(defaults)}")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        want = type(defaults[key])
        if want is float and isinstance(value, int):
            value = float(value)
        if not isinstance(value, want):
            raise ValueError(f"config argument {key}={raw!r} should be of type {want.__name__}")
        out[key] = value
    return ml_collections.ConfigDict(out)
