"""ImageNet batches on the host: grain pipelines (worker processes, checkpointable iterators) and the bare
multiprocessing loop they are benchmarked against. Both compute the same batches from the same functions.

A training batch is ``{"image": uint8 (b, 224, 224, 3), "lighting": float32 (b, 3), "label": int32 (b,)}``,
an eval batch ``{"image", "label", "mask": bool (b,)}``; the model's float input is
``imagenet.finish_batch(batch["image"], mean, batch.get("lighting"), xp=jnp)`` inside the jitted step (see
``imagenet`` for why uint8 travels). With workers, arrays may be views of shared memory: copy or put them on
the device, then drop them.

The source is any indexable sequence of ``{"image": encoded bytes, "label": int}``, e.g. TFDS's ArrayRecord
``tfds.data_source("imagenet2012", split="train", decoders={"image": tfds.decode.SkipDecoding()})`` (without
``SkipDecoding`` TFDS would decode every image in full first). It must pickle: workers are *spawned* processes
(JAX is not fork-safe), each gets a copy of the pipeline once and never starts a JAX backend (grain imports
``jax.profiler`` for its hooks; nothing here calls JAX).

Resume: a training batch is a function of the global step (``sharding.Stream``), so an iterator built with
``start_step=k`` yields exactly what an uninterrupted one yields from step k on, whatever the worker count.
grain's own iterator state (``it.get_state()`` / ``it.set_state()``, or ``grain.checkpoint.CheckpointSave``
with Orbax) also works, but only with the same worker count.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator, Sequence

import grain
import numpy as np
from absl import flags

from resflax.data import imagenet
from resflax.data.sharding import Stream, eval_examples, eval_steps


class TrainExample:
    """Local slot ``k`` of the stream (step ``k // local_batch``, position ``k % local_batch`` in it) ->
    ``{"image": uint8 HWC, "lighting": float32 (3,), "label": int32}``."""

    def __init__(self, source: Sequence[dict], stream: Stream, cfg: imagenet.Preprocess = imagenet.DEFAULT):
        self.source, self.stream, self.cfg = source, stream, cfg

    def __call__(self, slot: int) -> dict[str, np.ndarray]:
        step, j = divmod(slot, self.stream.local_batch)
        epoch, index = self.stream.example(self.stream.position(step, j))
        ex = self.source[index]
        crop, offset = imagenet.train_crop(ex["image"], self.stream.seed, epoch, index, self.cfg)
        return {"image": crop, "lighting": offset, "label": np.int32(ex["label"])}

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """The whole local batch of a global step (the bare loop's unit of work)."""
        b = self.stream.local_batch
        examples = [self(step * b + j) for j in range(b)]
        return {k: np.stack([ex[k] for ex in examples]) for k in examples[0]}


class EvalExample:
    """Local slot of the eval pass -> ``{"image": uint8 HWC, "label", "mask"}``; padding repeats example 0,
    masked."""

    def __init__(self, source: Sequence[dict], global_batch: int, process_index: int = 0, process_count: int = 1,
                 cfg: imagenet.Preprocess = imagenet.DEFAULT):
        self.source, self.cfg = source, cfg
        self.split = (global_batch, process_index, process_count)

    def __call__(self, slot: int) -> dict[str, np.ndarray]:
        step, j = divmod(slot, self.split[0] // self.split[2])
        indices, mask = eval_examples(step, len(self.source), *self.split)
        ex = self.source[int(indices[j])]
        return {"image": imagenet.eval_crop(ex["image"], self.cfg),
                "label": np.int32(ex["label"]), "mask": mask[j]}


def train_dataset(source: Sequence[dict], stream: Stream, num_steps: int, start_step: int = 0,
                  cfg: imagenet.Preprocess = imagenet.DEFAULT) -> grain.MapDataset:
    """This process's batches of global steps ``[start_step, start_step + num_steps)``."""
    b = stream.local_batch
    slots = grain.MapDataset.range(start_step * b, (start_step + num_steps) * b)
    return slots.map(TrainExample(source, stream, cfg)).batch(b, drop_remainder=True)


def eval_dataset(source: Sequence[dict], global_batch: int, process_index: int = 0,
                 process_count: int = 1, cfg: imagenet.Preprocess = imagenet.DEFAULT) -> grain.MapDataset:
    """Every example once, in order, in global batches split across processes; the last one padded and
    masked (``mask`` False on padding)."""
    if global_batch % process_count:
        raise ValueError(f"global_batch {global_batch} is not divisible by process_count {process_count}")
    local = global_batch // process_count
    slots = grain.MapDataset.range(eval_steps(len(source), global_batch) * local)
    fn = EvalExample(source, global_batch, process_index, process_count, cfg)
    return slots.map(fn).batch(local, drop_remainder=True)


def loader(dataset: grain.MapDataset, workers: int = 0, read_threads: int = 0,
           worker_buffer: int = 2) -> grain.DatasetIterator:
    """An iterator over ``dataset``: ``workers`` spawned processes each computing whole batches (worker w
    takes batches w, w + workers, ..., results come back in order through shared memory), and
    ``read_threads`` threads per process (0: none; Pillow releases the GIL, so threads also add cores)."""
    read = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=max(1, 2 * read_threads))
    ds = dataset.to_iter_dataset(read)
    if workers:
        # grain 0.2.18 reads an absl flag when it starts workers and fails unless flags were parsed (scripts
        # without absl.app: grain#1355, fixed after 0.2.18). Marking them parsed keeps every default.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=worker_buffer))
    return iter(ds)


# ---- the bare loop: the same batches through multiprocessing.Pool ---------------------------------------

_WORKER_FN: TrainExample | None = None  # set once per pool process: pickling the source per task would dominate


def _init_worker(fn: TrainExample) -> None:
    global _WORKER_FN
    _WORKER_FN = fn


def _worker_batch(step: int) -> dict[str, np.ndarray]:
    return _WORKER_FN.batch(step)


def bare_train_batches(source: Sequence[dict], stream: Stream, num_steps: int, start_step: int = 0,
                       workers: int = 0,
                       cfg: imagenet.Preprocess = imagenet.DEFAULT) -> Iterator[dict[str, np.ndarray]]:
    """The batches of ``train_dataset`` without grain: a loop, or ``workers`` spawned processes of a
    ``multiprocessing.Pool`` (batches pickled back through pipes)."""
    fn = TrainExample(source, stream, cfg)
    steps = range(start_step, start_step + num_steps)
    if not workers:
        yield from map(fn.batch, steps)
        return
    with multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(fn,)) as pool:
        yield from pool.imap(_worker_batch, steps)
