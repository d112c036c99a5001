"""Weights between resflax runs and PyTorch files: ``import_weights`` makes a workdir (``config.json`` and an
Orbax checkpoint at step 0) that ``resflax eval`` evaluates and ``resflax train`` fine-tunes like any other
run; ``export_weights`` writes a run's latest checkpoint as ``.safetensors`` in torchvision's or akamaster's
names; ``predict`` gives the top-5 classes of image files. The layouts are ``resflax.weights``'.

An import is atomic: the run is built beside the target (``DIR.importing-<pid>``: ``config.json``, then the
checkpoint, waited for until Orbax's asynchronous save is complete) and renamed to ``DIR`` in one
``rename(2)``, so ``DIR`` holds a complete run or nothing, whenever the import is killed. A build left by a
killed import is removed by the next import into ``DIR`` once its process is gone (its ``.lock``'s flock is
free and its pid no longer runs). ``DIR`` must not exist or be an empty directory, checked before anything
is read or written: a refused import touches nothing in an existing run, not even its ``.lock``.

The input preprocessing travels with the weights: an import records in the run's config the normalisation
the weights were trained with (torchvision/timm and akamaster: per-channel mean (0.485, 0.456, 0.406) and std
(0.229, 0.224, 0.225) on RGB in [0, 1]), and every later command of the run uses it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from safetensors import SafetensorError

from resflax import weights
from resflax.data import cifar10, imagenet, imagenet_source, jpeg
from resflax.data.files import cache_dir
from resflax.errors import BadInput, DataError, WorkdirError, WriteError
from resflax.train import evaluate, loop, tasks
from resflax.train import state as state_lib
from resflax.train import step as step_lib
from resflax.train import workdir as wd
from resflax.train.checkpoint import Checkpointer
from resflax.train.distributed import to_host

TORCH_STD = (0.229, 0.224, 0.225)
TORCH_MEAN = (0.485, 0.456, 0.406)


def _settings(config: ml_collections.ConfigDict, layout: str) -> dict[str, Any]:
    """The config settings the layout's weights need."""
    if layout == "torchvision":
        out = {"mean": "channel", "std": TORCH_STD}
        if not config.model.startswith("vgg"):
            out.update(stride_on_3x3=True, shortcut="B")  # v1.5 bottlenecks; projections where shapes change
        return out
    return {"pad_layout": "split", "mean": "channel", "std": TORCH_STD}  # akamaster


def import_weights(source: str | Path, config: ml_collections.ConfigDict, workdir: str | Path,
                   layout: str | None = None, say=print) -> dict[str, Any]:
    """Writes the weights of ``source`` into a new run in ``workdir`` (refused unless absent or an empty folder)."""
    layout = layout or ("cifar" if tasks.is_cifar(config) else "torchvision")
    path = Path(workdir).expanduser().absolute()
    _refuse_existing(path)  # before anything is read, locked or written
    state_dict = weights.read_state_dict(source)
    settings = _settings(config, layout)
    with config.unlocked():
        for k, v in settings.items():
            config[k] = v
    say("settings for these weights: " + ", ".join(f"{k}={v!r}" for k, v in settings.items()))
    try:  # the dataset, when it is here, gives the number of classes (and is checked now, not later)
        p = loop.plan(config)
    except DataError:
        p = loop.plan(config, locate_data=False)
    weights.check_variant(state_dict, p.model, layout)
    tx_fn = state_lib.optimizer(config)
    shape = tasks.image_shape(config)
    abstract = jax.eval_shape(lambda: p.model.init(jax.random.PRNGKey(0), jnp.zeros((1, *shape)), train=False))
    variables = weights.from_torch(state_dict, p.model, abstract, layout)
    init = state_lib.init_state(p.model, tx_fn, config.seed, shape, config.warmup)
    params = jax.tree_util.tree_map(jnp.asarray, variables["params"])
    stats = jax.tree_util.tree_map(jnp.asarray, variables.get("batch_stats", {}))
    state = init.replace(params=params, batch_stats=stats, opt_state=tx_fn(params).init(params))
    wd.prepare(path.parent)
    build, lock = _start_build(path)
    try:
        cfg = json.loads(config.to_json())
        wd.write_json_atomic(build / "config.json", cfg)
        host = to_host(step_lib.replicate(state, p.mesh))
        ckpt = Checkpointer(build, keep=config.keep_checkpoints)
        ckpt.save(0, step_lib.replicate(state, p.mesh),
                  {"config": cfg, "step": 0, "state_digest": state_lib.state_digest(host), "devices": int(p.mesh.size),
                   "processes": 1, "num_classes": int(p.model.num_classes),
                   "imported_from": Path(source).name, "layout": layout}, host_state=host)
        ckpt.close()  # waits until the asynchronous save is complete (or raises CheckpointError)
        _publish(build, path)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)  # a kill -9 leaves it instead: the next import removes it
        raise
    finally:
        lock.release()
    return {"workdir": str(path), "model": config.model, "layout": layout, "tensors": len(state_dict),
            "state_digest": state_lib.state_digest(host)}


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


def write_run(path: Path, config: ml_collections.ConfigDict, host_state: Any, meta: dict, mesh) -> str:
    """A new run in ``path`` (``new_run_dir``'s): ``config.json`` and one checkpoint of ``host_state`` at its
    step with ``meta`` (plus the config and the state digest), written beside ``path`` and renamed into place
    as an import is (atomic). Returns the state digest."""
    wd.prepare(path.parent)
    build, lock = _start_build(path)
    try:
        cfg = json.loads(config.to_json())
        wd.write_json_atomic(build / "config.json", cfg)
        digest = state_lib.state_digest(host_state)
        ckpt = Checkpointer(build, keep=config.keep_checkpoints)
        ckpt.save(int(host_state.step), step_lib.replicate(host_state, mesh),
                  {**meta, "config": cfg, "state_digest": digest}, host_state=host_state)
        ckpt.close()  # waits until the asynchronous save is complete (or raises CheckpointError)
        _publish(build, path)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    finally:
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
    try:
        weights.write_state_dict(sd, out)
    except (OSError, SafetensorError) as e:  # safetensors' own error for a file it cannot create
        raise WriteError(f"cannot write {out}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    return {"workdir": str(workdir), "out": str(out), "layout": layout, "step": int(to_host(state.step)),
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
    names = _class_names(config)
    variables = to_host({"params": state.params, "batch_stats": state.batch_stats})
    if tasks.is_cifar(config):
        size = 32
        cfg = None
    else:
        cfg = tasks.preprocess(config)
        size = cfg.size
    mean = _mean(config, size)
    std = np.asarray(config.std, np.float32) if config.get("std") else None
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
        probs = np.asarray(jax.nn.softmax(run.model.apply(variables, x, train=False)[0]))
        best = np.argsort(-probs, kind="stable")[:top]
        out.append({"image": str(f), "top": [{"class": int(i), "name": names[i] if names else str(int(i)),
                                               "probability": float(probs[i])} for i in best]})
    return out


def _mean(config, size: int) -> np.ndarray:
    if config.get("mean") == "channel":
        return np.asarray(TORCH_MEAN, np.float32)
    # the paper's per-pixel mean needs the training data (CIFAR-10's, or the cached ImageNet mean)
    if tasks.is_cifar(config):
        return cifar10.load(cifar10.locate(config.data_dir), config.val_examples, cache_dir(config)).mean

    src = imagenet_source.open_source(config.dataset, config.data_dir)
    train, _ = imagenet_source.split_train(src.train, config.val_examples)
    return imagenet_source.pixel_mean(src, train, cache_dir(config), config.mean_images, tasks.preprocess(config)).mean


def _class_names(config) -> list[str] | None:
    try:
        if tasks.is_cifar(config):
            return ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

        return imagenet_source.open_source(config.dataset, config.data_dir).class_names or None
    except Exception:  # noqa: BLE001 (no dataset here: class indices only)
        return None
