"""The loop's data seam: a *task* owns a dataset, its train step and its evaluation; the loop owns the rest
(workdir, checkpoints, signals, divergence, logging), the same for every dataset.

- ``CifarTask``: the split lives on the device and each step draws and augments its batch inside the jitted
  step (``step.make_train_step``); its input position is the step itself.
- ``ImageNetTask`` (any TFDS dataset of encoded images with ``train``/``validation`` splits, e.g.
  ``imagenet2012``): each process reads its own shard of the global batch on the host with a grain loader
  (``data.imagenet_input``), worker processes decode and augment, and the jitted step receives uint8 crops.
  Its input position is also the global step (``data.sharding.Stream``): the checkpoint's ``meta["input"]``
  records it with the stream's identity, and a resumed run rebuilds the loader at that step, so it sees the
  same images in the same order with the same augmentation, whatever its worker or process count.

A task's interface: ``event`` (what the loop records about the data), ``image_shape``, ``steps_per_epoch``,
``build(model, tx, step_cfg)``, ``start(step, saved_input)``, ``train_step(state, lr_scale)``,
``evaluate(state)``, ``input_state(step)``, ``close()``; ``CifarTask`` also ``build_population`` and
``population_step``. Tasks supply data; the learning rate is ``train.schedules``'.
``evaluate`` runs ``train.evaluators``' evaluator of each split; ``build_eval(model)`` prepares only that
(``resflax eval``: no train step, no training split on the device).
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from resflax.data import augment, cifar10, imagenet, imagenet_input, imagenet_source
from resflax.data.files import cache_dir
from resflax.data.imagenet import CHANNEL_MEAN
from resflax.data.sharding import Stream
from resflax.errors import BadInput, DataError
from resflax.train import evaluators
from resflax.train import step as step_lib

CIFAR = "cifar10"


def is_cifar(config) -> bool:
    return config.dataset == CIFAR


def locate(config) -> tuple[str, int | None]:
    """Finds the config's dataset before anything is written (``DataError`` if absent): its data_dir, and
    the number of classes the model needs (``None``: the model's own, CIFAR-10's 10). Checks
    ``val_examples`` against the training set's size."""
    if is_cifar(config):
        found = cifar10.locate(config.data_dir), None  # prepares it once if the prepare extra is installed
        num_train = 50_000
    else:
        src = imagenet_source.open_source(config.dataset, config.data_dir)
        found, num_train = (src.data_dir, config.get("num_classes") or src.num_classes), len(src.train)
    if config.val_examples and not 0 < config.val_examples < num_train:
        raise BadInput(f"val_examples must be in (0, {num_train}), got {config.val_examples}")
    return found


def validate(config, model) -> None:
    """Checks that the settings fit the task (``BadInput``); each value's own type, range and choices are
    ``configs.validate``'s (``loop.plan`` calls it first)."""
    if is_cifar(config):
        if model.stem != "cifar":
            raise BadInput(f"model {config.model!r} is an ImageNet model; CIFAR-10 needs a CIFAR model")
        return
    if model.stem == "cifar":
        raise BadInput(f"model {config.model!r} is a CIFAR model; {config.dataset} needs an ImageNet model")
    preprocess(config)  # its own checks (crop, resample, scale_range against image_size)
    if config.lr_schedule == "plateau" and not config.val_examples:
        raise BadInput("lr_schedule='plateau' watches a held-out split: set val_examples (e.g. 10000)")
    if config.get("warmup"):
        raise BadInput("warmup (the CIFAR ResNet-110 rule) does not apply to ImageNet; use lr_warmup_steps")


def preprocess(config):
    return imagenet.Preprocess(
        crop=config.crop, scale_range=tuple(config.scale_range), size=config.image_size,
        eval_resize=config.eval_resize, flip=config.flip, lighting_std=config.lighting_std, draft=config.draft,
        resample=config.resample)


def channel_mean(config) -> np.ndarray:
    """The per-channel mean that ``mean="channel"`` subtracts, float32 (3,): the config's ``channel_mean`` (the
    weights' source's, for an import), or ImageNet's for a config written before that key."""
    return np.asarray(config.get("channel_mean") or CHANNEL_MEAN, np.float32)


def image_shape(config) -> tuple[int, int, int]:
    return CifarTask.image_shape if is_cifar(config) else (config.image_size, config.image_size, 3)


def create(config, plan, say) -> Any:
    return (CifarTask if is_cifar(config) else ImageNetTask)(config, plan, say)


class CifarTask:
    """CIFAR-10 on the device (the paper's Sec. 4.2 pipeline, ``data.augment`` inside the step)."""

    image_shape = (32, 32, 3)

    def __init__(self, config, plan, say):
        t0 = time.time()
        self.config, self.mesh = config, plan.mesh
        self.data = data = cifar10.load(plan.data_dir, config.val_examples, cache_dir(config))
        how = "read from the decoded cache" if data.cached else "decoded"
        say(f"CIFAR-10 from {data.data_dir}: {len(data.train)} train / {len(data.test)} test"
            + (f" / {len(data.val)} val" if data.val else "") + f" ({how} in {time.time() - t0:.1f}s)")
        self.event = {"data_dir": data.data_dir, "train": len(data.train), "test": len(data.test),
                      "val": len(data.val) if data.val else 0}
        self.steps_per_epoch = len(data.train) // config.batch_size

    def _place(self) -> None:
        self._place_input()
        d = self.data
        self.train_x, self.train_y = step_lib.replicate((d.train.images, d.train.labels), self.mesh)

    def _place_input(self) -> None:
        """The input normalisation: the training images' per-pixel mean on the device (or, for imported
        weights, the per-channel mean) and the per-channel std (imported weights') or None."""
        d = self.data
        mean = d.mean
        self.std = np.asarray(self.config.std, np.float32) if self.config.get("std") else None
        if self.config.get("mean", "pixel") == "channel":  # imported weights' normalisation

            mean = np.broadcast_to(channel_mean(self.config), d.mean.shape).copy()
        self.mean = step_lib.replicate(mean, self.mesh)

    def _eval_step(self, model):
        std = self.std
        normalize = augment.normalize if std is None else (lambda im, m: augment.normalize(im, m) / std)
        return evaluators.make_eval_step(model, self.mesh, normalize)

    def build_eval(self, model) -> None:
        """What evaluating ``model`` needs, and nothing of training (``resflax eval``)."""
        self._place_input()
        self._eval = self._eval_step(model)

    def build(self, model, tx, step_cfg, stats_only: bool = False) -> None:
        self._place()
        self._train = step_lib.make_train_step(model, tx, step_cfg, self.mesh, std=self.std, stats_only=stats_only)
        self._eval = self._eval_step(model)

    def build_population(self, model, tx, step_cfg, residual, vectorize: str) -> None:
        """A population's step (``step.make_population_train_step``) and one eval step per member network."""
        self._place()
        self._train = step_lib.make_population_train_step(model, tx, step_cfg, self.mesh, len(residual),
                                                          std=self.std, residual=residual, vectorize=vectorize)
        evals = {r: self._eval_step(model.clone(residual=r)) for r in set(residual)}
        self._member_evals = [evals[r] for r in residual]

    def start(self, step: int, saved_input: dict | None) -> None:
        pass  # the batch of a step is drawn inside the step from (seed, step)

    def train_step(self, state, lr_scale: float = 1.0):
        if lr_scale != 1.0:  # the CIFAR configs have no host-side lr rule; never silently ignore one
            raise ValueError("CIFAR-10's train step takes no lr scale")
        return self._train(state, self.train_x, self.train_y, self.mean)

    def population_step(self, states, alive):
        return self._train(states, alive, self.train_x, self.train_y, self.mean)

    def evaluate(self, state, splits=("test", "val"), member: int | None = None) -> dict[str, dict]:
        """``{split: {"error", "loss", "count"}}`` of ``state`` (of population member ``member``)."""
        ev = self._eval if member is None else self._member_evals[member]
        out = {}
        for name, split in (("test", self.data.test), ("val", self.data.val)):
            if split is not None and name in splits:
                out[name] = evaluators.on_arrays(ev, split.images, split.labels, self.mean,
                                                 self.config.eval_batch_size, self.mesh).run(state)
        return out

    def input_state(self, step: int) -> dict:
        return {"kind": "cifar10-device", "step": int(step)}

    def close(self) -> None:
        pass


class ImageNetTask:
    """A TFDS dataset of encoded images read through a grain loader (the paper's Sec. 3.4 pipeline)."""

    def __init__(self, config, plan, say):
        self.config, self.mesh, self.say, self.num_steps = config, plan.mesh, say, plan.num_steps
        self.cfg = preprocess(config)
        self.workers = config.loader_workers
        if self.workers == -1:
            self.workers = max(0, min(32, (os.cpu_count() or 1) - 1))
        src = imagenet_source.open_source(config.dataset, plan.data_dir)
        train, self.val = imagenet_source.split_train(src.train, config.val_examples)
        self.train, self.test, self.source = train, src.validation, src
        self.pcount, self.pindex = jax.process_count(), jax.process_index()
        if config.batch_size % self.pcount:
            raise BadInput(f"batch_size {config.batch_size} is not divisible by the {self.pcount} processes")
        self.stream = Stream(len(train), config.batch_size, config.seed, self.pindex, self.pcount)
        self.fingerprint = imagenet_source.fingerprint(train)
        self.steps_per_epoch = len(train) / config.batch_size
        t0 = time.time()
        if config.mean == "pixel":
            pm = imagenet_source.pixel_mean(src, train, cache_dir(config), config.mean_images, self.cfg,
                                            self.fingerprint)
            self.mean_host = pm.mean
            how = f"{'read from' if pm.cached else 'computed from'} {min(config.mean_images, len(train))} " \
                  f"training images, cached at {pm.path}"
            how += "" if pm.cached else f" ({time.time() - t0:.0f}s)"
        else:
            self.mean_host = channel_mean(config)
            how = f"per-channel {tuple(float(v) for v in self.mean_host)}"
        self.std_host = np.asarray(config.std, np.float32) if config.get("std") else None
        if self.std_host is not None:
            how += f", divided by the per-channel std {tuple(float(v) for v in self.std_host)}"
        say(f"{src.name} {src.version} from {src.data_dir}: {len(train)} train / {len(self.test)} validation"
            + (f" / {len(self.val)} held out" if self.val is not None else "")
            + f", {src.num_classes} classes; mean {how}")
        self.event = {"data_dir": src.data_dir, "dataset": src.name, "version": src.version,
                      "train": len(train), "test": len(self.test), "val": len(self.val) if self.val else 0,
                      "mean": config.mean, "loader_workers": self.workers}
        self._it = None
        self._next_step = None

    @property
    def image_shape(self):
        return (self.cfg.size, self.cfg.size, 3)

    def build(self, model, tx, step_cfg, stats_only: bool = False) -> None:
        std = self.std_host  # imported weights' normalisation (e.g. torchvision's); None: the paper's

        def finish(images, mean, lighting):
            x = imagenet.finish_batch(images, mean, lighting, xp=jnp)
            return x if std is None else x / std

        self._train = step_lib.make_batch_train_step(model, tx, step_cfg, self.mesh, finish, stats_only)
        self._eval = self._eval_step(model)
        self.mean = step_lib.replicate(self.mean_host, self.mesh)
        self._sharded = NamedSharding(self.mesh, P(step_lib.AXIS))

    # ---- training input ----------------------------------------------------------------------------------

    def start(self, step: int, saved_input: dict | None) -> None:
        """Positions the input at global step ``step`` (checking a checkpoint's record of it)."""
        if saved_input is not None:
            want = self.input_state(step)
            if saved_input.get("kind") != want["kind"] or int(saved_input.get("step", -1)) != step:
                raise DataError(f"the checkpoint's input record {saved_input} does not belong to step {step}")
            if (saved_input.get("fingerprint"), saved_input.get("num_examples")) != (want["fingerprint"],
                                                                                     want["num_examples"]):
                self.say(f"note: the training set differs from the one this run started with "
                         f"({saved_input.get('num_examples')} -> {want['num_examples']} images, or other "
                         "images): training continues, but will not reproduce an uninterrupted run")
        self._open(step)

    def _open(self, step: int) -> None:
        self.close()
        remaining = max(0, self.num_steps - step)
        ds = imagenet_input.train_dataset(self.train, self.stream, remaining, start_step=step, cfg=self.cfg)
        self._it = imagenet_input.loader(ds, workers=self.workers, read_threads=self.config.loader_threads)
        self._next_step = step

    def _global(self, local: np.ndarray) -> jax.Array:
        return jax.make_array_from_process_local_data(self._sharded, np.ascontiguousarray(local))

    def train_step(self, state, lr_scale: float = 1.0):
        """One step on the next batch; ``lr_scale`` multiplies the schedule's lr (the plateau rule's drops)."""
        batch = next(self._it)
        self._next_step += 1
        images, lighting, labels = (self._global(batch[k]) for k in ("image", "lighting", "label"))
        return self._train(state, images, lighting, labels, self.mean, np.float32(lr_scale))

    def input_state(self, step: int) -> dict:
        out = {"kind": "stream", "step": int(step), "seed": self.config.seed, "num_examples": len(self.train),
               "global_batch": self.config.batch_size, "fingerprint": self.fingerprint}
        return out

    # ---- evaluation ----------------------------------------------------------------------------------------

    def _eval_step(self, model):
        """The eval program: the centre crop normalised as in training (without lighting), top-1 and top-5."""
        std = self.std_host

        def normalize(images, mean):
            x = imagenet.finish_batch(images, mean, None, xp=jnp)
            return x if std is None else x / std

        return evaluators.make_eval_step(model, self.mesh, normalize, top5=True)

    def build_eval(self, model) -> None:
        """What evaluating ``model`` needs, and nothing of training (``resflax eval``)."""
        self._eval = self._eval_step(model)
        self.mean = step_lib.replicate(self.mean_host, self.mesh)

    def evaluate(self, state, splits=("test", "val"), member: int | None = None) -> dict[str, dict]:
        """``{split: {"error", "top5_error", "loss", "count"}}`` of ``state`` (the validation split is "test",
        the held-out part of the training split "val"); no populations here (``member`` must be None)."""
        if member is not None:
            raise ValueError(f"{self.config.dataset} runs have no population members")
        out = {}
        for name, source in (("test", self.test), ("val", self.val)):
            if source is not None and name in splits:
                out[name] = evaluators.on_loader(self._eval, source, self.cfg, self.mean, self.config.eval_batch_size,
                                                 self.mesh, self.workers, self.config.loader_threads).run(state)
        return out

    def close(self) -> None:
        it, self._it = self._it, None
        if it is not None:
            it.close()  # stops grain's worker processes
