"""Weights between resflax runs and PyTorch files: ``import_weights`` makes a workdir (``config.json`` and an
Orbax checkpoint at step 0) that ``resflax eval`` evaluates and ``resflax train`` fine-tunes like any other
run; ``export_weights`` writes a run's latest checkpoint as ``.safetensors`` in torchvision's or akamaster's
names; ``predict`` gives the top-5 classes of image files. The layouts are ``resflax.weights``'.

An import is atomic: the run is built beside the target (``DIR.importing-<pid>``: ``config.json``, then the
checkpoint, waited for until Orbax's asynchronous save is complete) and renamed to ``DIR`` in one
``rename(2)``, so ``DIR`` holds a complete run or nothing, whenever the import is killed. A build left by a
killed import is removed by the next import into ``DIR`` once its process is gone (its ``.lock``'s flock is
free and its pid no longer runs). SIGTERM and SIGINT (``resflax.interrupts``) stop an import at once while it only
reads; while it writes, the save in flight completes and then the build is removed (twice, the same; a third
stops at once, as a kill does): exit 130 and ``DIR`` as it was. ``DIR`` must not exist or be an empty
directory, checked before anything is read or written: a refused import touches nothing in an existing run, not
even its ``.lock``.

The preprocessing travels with the weights: an import records in the run's config how the weights' source
evaluated them (``SOURCES``, ``timm_preprocessing``): the filter, the resize and crop sizes, the per-channel mean
and std. ``eval``, ``predict`` and fine-tuning (``train`` on the run) use them, and the evaluation crops are
pixel-identical to the source's own (``data.jpeg``). A ``--config.KEY`` given on the command line wins over the
source's value (said at import).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from safetensors import SafetensorError

from resflax import configs, weights
from resflax.data import cifar10, imagenet, imagenet_source, jpeg
from resflax.data.files import cache_dir
from resflax.errors import BadInput, DataError, WorkdirError, WriteError
from resflax.interrupts import Interrupts, check_interrupted
from resflax.train import evaluate, loop, tasks
from resflax.train import state as state_lib
from resflax.train import step as step_lib
from resflax.train import workdir as wd
from resflax.train.checkpoint import Checkpointer
from resflax.train.distributed import to_host

TORCH_STD = (0.229, 0.224, 0.225)
TORCH_MEAN = (0.485, 0.456, 0.406)

# How each source evaluated its weights, as config settings. torchvision: its weights' ``transforms`` preset
# (ImageClassification: Resize(256) + CenterCrop(224), bilinear, on the PIL image; its IMAGENET1K_V2 ResNet
# weights use resize_size=232: give --config.eval_resize=232), ImageNet's mean and std. akamaster
# (pytorch_resnet_cifar10/trainer.py): CIFAR-10's 32x32 images as stored, the same mean and std.
SOURCES = {
    "torchvision": {"mean": "channel", "channel_mean": TORCH_MEAN, "std": TORCH_STD, "resample": "bilinear",
                    "eval_resize": 256, "image_size": 224},
    "akamaster": {"mean": "channel", "channel_mean": TORCH_MEAN, "std": TORCH_STD},
}
# The fields of a timm pretrained config that make its eval transform, with the values timm's
# resolve_data_config gives those absent (timm 1.0: timm/data/config.py, constants.py).
TIMM_DEFAULTS = {"interpolation": "bicubic", "crop_pct": 0.875, "mean": TORCH_MEAN, "std": TORCH_STD,
                 "input_size": (3, 224, 224), "crop_mode": "center"}


# The network settings a layout implies by default; a value the command line gave is kept instead (weight shapes
# cannot tell v1 from v1.5, nor option A's zero-padding layout: the user's word is honoured, and
# ``weights.from_torch`` refuses a file that cannot be the chosen network, e.g. a shortcut option it lacks).
NETWORK_KEYS = ("stride_on_3x3", "shortcut", "pad_layout")


def _settings(config: ml_collections.ConfigDict, layout: str, given: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The config settings the layout's weights need, less the network settings in ``given`` (the keys the
    command line set: kept as given)."""
    if layout == "torchvision":
        out = {}
        if not config.model.startswith("vgg"):
            out.update(stride_on_3x3=True, shortcut="B")  # v1.5 bottlenecks; projections where shapes change
    else:
        out = {"pad_layout": "split"}  # akamaster
    return {k: v for k, v in out.items() if k not in given or k not in NETWORK_KEYS}


def read_timm_config(path: str | Path) -> dict[str, Any]:
    """The preprocessing fields (``TIMM_DEFAULTS``' names) of a timm pretrained config file: the ``config.json``
    timm's models have on the Hugging Face hub (the fields under ``pretrained_cfg``) or a ``pretrained_cfg``
    dict written as JSON."""
    try:
        d = json.loads(Path(path).read_text())
    except OSError as e:
        raise BadInput(f"cannot read {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise BadInput(f"{path} is not JSON ({e})") from None
    cfg = d.get("pretrained_cfg", d) if isinstance(d, dict) else None
    if not isinstance(cfg, dict) or not any(k in cfg for k in TIMM_DEFAULTS):
        raise BadInput(f"{path} is not a timm pretrained config: none of {', '.join(TIMM_DEFAULTS)} in it")
    return {k: cfg[k] for k in TIMM_DEFAULTS if cfg.get(k) is not None}


def timm_preprocessing(cfg: dict[str, Any]) -> dict[str, Any]:
    """timm's eval transform for a pretrained config (``TIMM_DEFAULTS`` where a field is absent) as config
    settings: ``Resize(floor(size / crop_pct), interpolation)`` + ``CenterCrop(size)``, then mean and std, as
    ``timm.data.create_transform(**resolve_data_config(...))`` makes it for crop_mode "center"."""
    c = {**TIMM_DEFAULTS, **{k: v for k, v in cfg.items() if v is not None}}
    if c["interpolation"] not in jpeg.RESAMPLE:
        raise BadInput(f"timm interpolation {c['interpolation']!r} is not one of {', '.join(jpeg.RESAMPLE)}")
    if c["crop_mode"] != "center":
        raise BadInput(f"timm crop_mode {c['crop_mode']!r}: resflax evaluates timm's 'center' mode only (a "
                       "shorter-side resize, then a centre crop)")
    size = c["input_size"]
    if not (isinstance(size, list | tuple) and len(size) == 3 and size[1] == size[2] and isinstance(size[1], int)
            and size[1] > 0):
        raise BadInput(f"timm input_size must be (3, N, N), got {size!r}")
    pct = c["crop_pct"]
    if not (isinstance(pct, int | float) and 0 < pct <= 1):
        raise BadInput(f"timm crop_pct must be in (0, 1], got {pct!r}")
    out = {"mean": "channel", "channel_mean": c["mean"], "std": c["std"], "resample": c["interpolation"],
           "image_size": size[1], "eval_resize": math.floor(size[1] / pct)}
    for key in ("channel_mean", "std"):
        configs.check(key, out[key])
        out[key] = tuple(float(v) for v in out[key])
    return out


def preprocessing(config: ml_collections.ConfigDict, layout: str,
                  timm: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """(source name, config settings) of the weights' evaluation preprocessing: timm's when ``timm`` (its
    pretrained config fields) is given, else the layout's source's."""
    if timm is not None:
        if tasks.is_cifar(config):
            raise BadInput("timm's preprocessing (--timm_config, --interpolation, --crop_pct) is for ImageNet models")
        return "timm", timm_preprocessing(timm)
    source = "torchvision" if layout == "torchvision" else "akamaster"
    return source, dict(SOURCES[source])


def import_weights(source: str | Path, config: ml_collections.ConfigDict, workdir: str | Path,
                   layout: str | None = None, say=print, timm: dict[str, Any] | None = None,
                   given: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Writes the weights of ``source`` into a new run in ``workdir`` (refused unless absent or an empty folder),
    with the source's preprocessing (``preprocessing``; ``timm``: a timm pretrained config's fields). ``given``:
    the config keys the command line set, kept as given (and said): a preprocessing setting, or a network
    setting (``NETWORK_KEYS``: v1 with ``stride_on_3x3=False``, a shortcut option, option A's ``pad_layout``)
    used instead of the layout's default and recorded in the run's config like every setting."""
    layout = layout or ("cifar" if tasks.is_cifar(config) else "torchvision")
    path = new_run_dir(workdir)  # refused before anything is read, locked or written
    with Interrupts(defer=False) as interrupts:  # nothing written yet: a signal stops the import at once
        return _import(source, config, path, layout, say, timm, given, interrupts)


def _import(source, config, path: Path, layout: str, say, timm, given, interrupts: Interrupts) -> dict[str, Any]:
    prep_source, prep = preprocessing(config, layout, timm)
    state_dict = weights.read_state_dict(source)
    kept = {k: config[k] for k in prep if k in given}
    settings = {**_settings(config, layout, given), **{k: v for k, v in prep.items() if k not in given}}
    size = settings.get("image_size")
    if size is not None and "scale_range" not in given and size > config.scale_range[0]:
        settings["scale_range"] = (size, max(size, config.scale_range[1]))  # fine-tuning's scales start at the crop
    with config.unlocked():
        for k, v in settings.items():
            config[k] = v
    network = [k for k in NETWORK_KEYS if k in given and k in config and not config.model.startswith("vgg")]
    said = [*(f"{k}={v!r}" for k, v in settings.items()), *(f"{k}={config[k]!r} (as given)" for k in network)]
    say(f"settings for these weights ({prep_source}'s preprocessing): " + ", ".join(said))
    if kept:
        say("kept from the command line: " + ", ".join(f"{k}={v!r} ({prep_source}: {prep[k]!r})"
                                                        for k, v in kept.items()))
    try:  # the dataset, when it is here, gives the number of classes (and is checked now, not later)
        p = loop.plan(config)
    except DataError:
        p = loop.plan(config, locate_data=False)
    tx_fn = state_lib.optimizer(config)
    shape = tasks.image_shape(config)
    # shapes only: the weights come from the file, so nothing is initialised (no eager model.init)
    abstract = jax.eval_shape(lambda: p.model.init(jax.random.PRNGKey(0), jnp.zeros((1, *shape)), train=False))
    variables = weights.from_torch(state_dict, p.model, abstract, layout)
    # the rest of the state (optimizer state, step, rng, warm-up) around them in one program, which the
    # compilation cache keeps, instead of one eagerly compiled op per optimizer leaf shape
    state = jax.jit(lambda v: state_lib.init_state(p.model, tx_fn, config.seed, shape, config.warmup, v))(variables)
    meta = {"step": 0, "devices": int(p.mesh.size), "processes": 1, "num_classes": int(p.model.num_classes),
            "imported_from": Path(source).name, "layout": layout,
            "preprocessing": {"source": prep_source, **({"timm": timm} if timm is not None else {})}}
    digest = write_run(path, config, to_host(state), meta, p.mesh, interrupts)
    return {"workdir": str(path), "model": config.model, "layout": layout, "tensors": len(state_dict),
            "state_digest": digest, "preprocessing": prep_source}


BUILDING = ".importing-"  # DIR.importing-<pid>: an import's run while it is being written


def _refuse_existing(path: Path) -> None:
    """``WorkdirError`` unless ``path`` is absent or an empty directory; reads only (no lock taken in it)."""
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_dir():
        raise WorkdirError(f"{path} exists and is not a directory; import into a new directory")
    names = sorted(p.name for p in path.iterdir())
    if not names:
        return
    if "config.json" in names or "checkpoints" in names:
        raise WorkdirError(f"workdir {path} already holds a run; import into a new directory")
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    raise WorkdirError(f"workdir {path} is not empty ({shown}); import into a new or empty directory")


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove_stale_builds(path: Path) -> None:
    """Removes the builds of ``path`` left by killed imports: their pid runs no more (or is ours, reused) and
    their ``.lock`` is free. A build whose pid runs is left alone: its import may be about to lock it."""
    prefix = path.name + BUILDING
    for d in sorted(path.parent.iterdir()):
        pid = d.name[len(prefix):]
        if not d.name.startswith(prefix) or not pid.isdigit() or not d.is_dir() or d.is_symlink():
            continue
        if int(pid) != os.getpid() and _running(int(pid)):
            continue
        lock = wd.Lock(d)
        try:
            lock.acquire()  # a free flock: no process (on any machine sharing the folder) writes it
        except (WorkdirError, OSError):
            continue
        try:
            shutil.rmtree(d, ignore_errors=True)
        finally:
            lock.release()


def _start_build(path: Path) -> tuple[Path, wd.Lock]:
    """A new, locked, empty directory beside ``path`` on the same file system, for the run to be built in."""
    _remove_stale_builds(path)
    build = path.with_name(f"{path.name}{BUILDING}{os.getpid()}")
    try:
        build.mkdir()
    except OSError as e:
        raise WorkdirError(f"cannot create {build}: {e.strerror or e}") from None
    lock = wd.Lock(build)
    lock.acquire()
    return build, lock


def _publish(build: Path, path: Path) -> None:
    """Renames the complete ``build`` to ``path`` in one step (``path`` absent or an empty directory)."""
    _refuse_existing(path)  # what appeared while the import ran: a clearer message than rename's
    try:
        os.rename(build, path)
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise WorkdirError(f"workdir {path} was filled by another process during the import; "
                               "import into a new directory") from None
        raise WorkdirError(f"cannot rename {build} to {path}: {e.strerror or e}") from None
    with contextlib.suppress(OSError):  # the rename itself on disk, should the machine go down next
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def new_run_dir(workdir: str | Path) -> Path:
    """``workdir`` as an absolute path for a new run (``write_run``); ``WorkdirError`` unless it is absent or
    an empty folder (checked before anything is read, locked or written)."""
    path = Path(workdir).expanduser().absolute()
    _refuse_existing(path)
    return path


def write_run(path: Path, config: ml_collections.ConfigDict, host_state: Any, meta: dict, mesh,
              interrupts: Interrupts | None = None) -> str:
    """A new run in ``path`` (``new_run_dir``'s): ``config.json`` and one checkpoint of ``host_state`` at its
    step with ``meta`` (plus the config and the state digest), written beside ``path`` and renamed into place
    as an import is (atomic). Returns the state digest.

    SIGTERM/SIGINT (``interrupts``: the caller's, else taken in hand here) while it is written are deferred: the
    save in flight completes, then the build is removed and ``KeyboardInterrupt`` raised (the command exits 130
    with ``path`` as it was); a second signal exits 130 at once and leaves the build folder, which the next
    import or ``bn-stats`` into ``path`` removes."""
    with contextlib.ExitStack() as stack:
        if interrupts is None:
            interrupts = stack.enter_context(Interrupts())
        interrupts.check()  # a signal that came before, its exception lost on the way (interrupts.py)
        interrupts.defer = interrupts.hard = True
        wd.prepare(path.parent)
        build, lock = _start_build(path)
        interrupts.cleanup = lambda: shutil.rmtree(build, ignore_errors=True)
        try:
            cfg = json.loads(config.to_json())
            wd.write_json_atomic(build / "config.json", cfg)
            digest = state_lib.state_digest(host_state)  # once: hashing ResNet-50's weights takes ~0.1 s
            ckpt = Checkpointer(build, keep=config.keep_checkpoints)
            ckpt.save(int(host_state.step), step_lib.replicate(host_state, mesh),
                      {**meta, "config": cfg, "state_digest": digest}, host_state=host_state)
            ckpt.close()  # waits until the asynchronous save is complete (or raises CheckpointError)
            interrupts.check()
            _publish(build, path)
        except BaseException:
            shutil.rmtree(build, ignore_errors=True)  # a kill -9 leaves it instead: the next import removes it
            raise
        finally:
            interrupts.cleanup = None
            lock.release()
    return digest


def export_weights(workdir: str | Path, out: str | Path, layout: str | None = None) -> dict[str, Any]:
    """The latest good checkpoint of ``workdir`` as a ``.safetensors`` state dict (read-only on the workdir)."""
    if Path(out).suffix != ".safetensors":
        raise BadInput(f"--out must name a .safetensors file, got {out}")
    _check_writable(Path(out))  # before the checkpoint is read
    config, run, state = evaluate.restore(workdir, locate_data=False, purpose="export")
    layout = layout or ("cifar" if tasks.is_cifar(config) else "torchvision")
    weights.check_variant({}, run.model, layout)  # a v1 or append-layout model would load silently and differ
    host = to_host({"params": state.params, "batch_stats": state.batch_stats})
    sd = weights.to_torch(host, run.model, layout)
    check_interrupted()  # an interrupt that came while reading: nothing written
    try:
        weights.write_state_dict(sd, out)
    except (OSError, SafetensorError) as e:  # safetensors' own error for a file it cannot create
        raise WriteError(f"cannot write {out}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    return {"workdir": str(workdir), "out": str(out), "layout": layout, "step": state.step,
            "tensors": len(sd)}


def _check_writable(out: Path) -> None:
    """``WriteError`` naming ``out`` if its folder is missing or it cannot be written there (nothing is created)."""
    folder = out.parent
    if not folder.is_dir():
        raise WriteError(f"cannot write {out}: no folder {folder}")
    if out.is_dir() or not os.access(out if out.exists() else folder, os.W_OK):
        raise WriteError(f"cannot write {out}: {'a folder' if out.is_dir() else 'permission denied'}")


def predict(workdir: str | Path, images: list[str], top: int = 5) -> list[dict[str, Any]]:
    """Top-``top`` classes (index, name, probability) of each image file, with the run's preprocessing."""
    config, run, state = evaluate.restore(workdir, locate_data=False, purpose="predict with")
    names = class_names(config, int(run.model.num_classes))
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    if tasks.is_cifar(config):
        size = 32
        cfg = None
    else:
        cfg = tasks.preprocess(config)
        size = cfg.size
    mean = _mean(config, size)
    std = np.asarray(config.std, np.float32) if config.get("std") else None
    # one compiled program (kept in the compilation cache), not one per operation of an eager forward pass: the
    # forward pass evaluate.restore traced when it checked the variables against the network
    forward = state.forward.lower().compile()
    out = []
    for f in images:
        data = Path(f).read_bytes()
        try:
            if cfg is None:  # CIFAR: the whole image at 32x32

                w, h = jpeg.image_size(data)
                crop = jpeg.decode_box(data, (0, 0, w, h), (32, 32))
            else:
                crop = imagenet.eval_crop(data, cfg)
        except Exception as e:  # noqa: BLE001 (Pillow raises several types for "not an image")
            why = str(e).splitlines()[0] if str(e) else ""  # Pillow's "cannot identify" names a BytesIO: not said
            why = "" if "object at 0x" in why else f" ({why})" if why else ""
            raise BadInput(f"{f} is not an image Pillow can read{why}") from e
        x = crop[None].astype(np.float32) / 255 - mean
        if std is not None:
            x = x / std
        logits = np.asarray(forward(variables, x), np.float64)[0]
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        best = np.argsort(-probs, kind="stable")[:top]
        out.append({"image": str(f), "top": [{"class": int(i), "name": names[i] if names else None,
                                               "probability": float(probs[i])} for i in best]})
    return out


def _mean(config, size: int) -> np.ndarray:
    if config.get("mean") == "channel":
        return tasks.channel_mean(config)
    # the paper's per-pixel mean needs the training data (CIFAR-10's, or the cached ImageNet mean)
    if tasks.is_cifar(config):
        return cifar10.load(cifar10.locate(config.data_dir), config.val_examples, cache_dir(config)).mean

    src = imagenet_source.open_source(config.dataset, config.data_dir)
    train, _ = imagenet_source.split_train(src.train, config.val_examples)
    return imagenet_source.pixel_mean(src, train, cache_dir(config), config.mean_images, tasks.preprocess(config)).mean


NO_NAMES = "(no names for this dataset)"


def class_names(config, num_classes: int) -> list[str] | None:
    """The English names of a run's ``num_classes`` classes: CIFAR-10's; ImageNet's 1000 (shipped with resflax,
    ``imagenet.class_names``) for an ``imagenet2012`` run, its data present or not; any other dataset's own
    label names when it is here; else None (``NO_NAMES``)."""
    if tasks.is_cifar(config):
        return ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    if config.dataset == imagenet_source.IMAGENET and num_classes == imagenet.NUM_CLASSES:
        return imagenet.class_names()
    try:
        names = imagenet_source.open_source(config.dataset, config.data_dir).class_names
    except Exception:  # noqa: BLE001 (no dataset here: class indices only)
        return None
    return names if len(names) == num_classes else None
