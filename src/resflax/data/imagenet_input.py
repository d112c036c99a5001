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

Worker processes never outlive the process that started them: each one watches its parent and exits within
``WATCH_S`` seconds once it is gone, however it ended (``kill -9`` included); the ``multiprocessing`` resource
tracker then sees every user of its pipe gone and unlinks the shared memory (``/dev/shm``) still registered.
A batch's shared memory loses its name (``/dev/shm`` entry) as soon as the batch reaches this process: the
memory stays mapped while the arrays live, but nothing is left to unlink at exit (see ``Batches``).

Resume: a training batch is a function of the global step (``sharding.Stream``), so an iterator built with
``start_step=k`` yields exactly what an uninterrupted one yields from step k on, whatever the worker count.
grain's own iterator state (``it.get_state()`` / ``it.set_state()``, or ``grain.checkpoint.CheckpointSave``
with Orbax) also works, but only with the same worker count.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import threading
import time
from collections.abc import Iterator, Sequence

import numpy as np
from absl import flags

from resflax.data import imagenet
from resflax.data.sharding import Stream, eval_examples, eval_steps
from resflax.lazy import LazyModule

# imported when a loader is first built
grain = LazyModule("grain")
grain_mp = LazyModule("grain.multiprocessing")


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


# ---- worker processes that end with their parent ------------------------------------------------------

WATCH_S = 0.25  # how often a worker checks that the process that started it is still there


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(WATCH_S)
    os._exit(1)  # the training process is gone (kill -9, a crash, os._exit): nobody reads what we compute


def exit_with_parent(parent: int, *_worker) -> None:
    """Run in a worker process (grain's ``worker_init_fn``, a ``multiprocessing.Pool`` initializer): a daemon
    thread ends this process once its parent, the process ``parent``, is gone.

    Polling ``os.getppid()`` rather than ``prctl(PR_SET_PDEATHSIG)``: grain 0.2.18 starts each worker from
    one of its prefetch threads, and the death signal fires when that *thread* ends (the iterator exhausted,
    a ``set_state``), not the process. A parent gone before this runs is caught too (the worker is reparented
    at once, so its parent pid already differs)."""
    threading.Thread(target=_watch_parent, args=(parent,), name="resflax-watch-parent", daemon=True).start()


def _release_names(leaf):
    """A batch array in shared memory: unlink its name now (the mapping stays valid until the array is
    freed) and tell grain not to unlink it again when the array is freed."""
    if isinstance(leaf, grain_mp.SharedMemoryArray) and getattr(leaf, "shm", None) is not None:
        if getattr(leaf, "_unlink_on_del", False):
            leaf._unlink_on_del = False
            leaf.shm.unlink()  # also unregisters it from multiprocessing's resource tracker
    return leaf


def _noop() -> None:
    pass


class Batches(Iterator):
    """grain's iterator over worker processes (``loader(..., workers > 0)``), yielding the same batches, with
    no shared memory left named once a batch is received or the iterator closed.

    grain 0.2.18 unlinks a batch's shared memory when its arrays are freed, from a thread pool. But its
    prefetch threads keep exceptions (the end of iteration included) with their tracebacks in reference
    cycles whose frames still hold the last batches they passed on; the last of these are freed only by the
    interpreter's final collection, after that pool and the modules are gone, so nothing unlinks them and
    the resource tracker reports "There appear to be N leaked shared_memory objects" (and unlinks them) at
    every exit of a run with workers. Unlinking each batch's name on receipt leaves nothing to leak (the
    memory itself is freed with the arrays, or at exit); ``close`` waits for grain's pending unlinks of the
    batches it dropped unread. A received batch can no longer be sent to another process by name (nothing
    here does). ``get_state``/``set_state`` and any other attribute are grain's."""

    def __init__(self, it: grain.DatasetIterator):
        self._it = it

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._it)
        return {k: _release_names(v) for k, v in batch.items()} if isinstance(batch, dict) else batch

    def get_state(self):
        return self._it.get_state()

    def set_state(self, state) -> None:
        self._it.set_state(state)

    def close(self) -> None:
        self._it.close()  # stops the workers; batches still buffered are freed, their unlinks queued
        pool = getattr(grain_mp.SharedMemoryArray, "_del_thread_pool", None)
        if pool is not None:  # one thread, first in first out: once this no-op ran, the unlinks before it did
            try:
                pool.apply_async(_noop).wait(timeout=10)
            except (ValueError, AssertionError):  # the pool was already shut down (interpreter exit)
                pass

    def __getattr__(self, name):
        if name == "_it":  # not set yet
            raise AttributeError(name)
        return getattr(self._it, name)


def loader(dataset: grain.MapDataset, workers: int = 0, read_threads: int = 0,
           worker_buffer: int = 2) -> grain.DatasetIterator | Batches:
    """An iterator over ``dataset``: ``workers`` spawned processes each computing whole batches (worker w
    takes batches w, w + workers, ..., results come back in order through shared memory), and
    ``read_threads`` threads per process (0: none; Pillow releases the GIL, so threads also add cores).
    Close it when done (``close()``): that stops the workers; they also stop if this process dies."""
    read = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=max(1, 2 * read_threads))
    ds = dataset.to_iter_dataset(read)
    if not workers:
        return iter(ds)
    # grain 0.2.18 reads an absl flag when it starts workers and fails unless flags were parsed (scripts
    # without absl.app: grain#1355, fixed after 0.2.18). Marking them parsed keeps every default.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=worker_buffer),
                        worker_init_fn=functools.partial(exit_with_parent, os.getpid()))
    return Batches(iter(ds))


# ---- the bare loop: the same batches through multiprocessing.Pool ---------------------------------------

_WORKER_FN: TrainExample | None = None  # set once per pool process: pickling the source per task would dominate


def _init_worker(fn: TrainExample, parent: int) -> None:
    global _WORKER_FN
    _WORKER_FN = fn
    exit_with_parent(parent)


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
    with multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker,
                                                    initargs=(fn, os.getpid())) as pool:
        yield from pool.imap(_worker_batch, steps)
