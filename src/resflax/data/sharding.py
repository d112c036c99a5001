"""Which examples each process reads at each step, as a pure function of (seed, step, process).

Training reads one endless **stream**: epoch 0's permutation of the training set, then epoch 1's, ... (a new
permutation per epoch, drawn from the seed). Global step ``s`` takes stream positions ``[s*B, (s+1)*B)``
(``B`` = global batch) and process ``p`` of ``P`` takes the contiguous ``B/P`` of them at ``p*B/P``. So:

- every training image is read exactly once per epoch across all processes, and nothing is dropped: when
  ``N`` is not a multiple of ``B`` the last global batch of an epoch is completed with the first examples of
  the next epoch's permutation (the paper counts iterations, not epochs). Such a batch may, rarely, hold the
  same image twice (once per epoch, augmented differently);
- the global batch of a step is the same whatever the process count; only its split differs;
- the **position is the global step**: it alone fixes everything that follows (``epoch_at`` gives the epoch),
  which is all an exact resume needs, even with another process or worker count.

Evaluation reads every example exactly once, in order, padded to whole global batches with a mask.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

PERMUTATION_TAG = 1  # first word of the permutation's seed; augmentation seeds use another (see imagenet.py)


@functools.lru_cache(maxsize=4)  # keyed by values; a step touches at most two epochs
def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The order in which epoch ``epoch`` reads the ``num_examples`` training examples (read-only)."""
    perm = np.random.default_rng([PERMUTATION_TAG, seed, epoch]).permutation(num_examples)
    perm.flags.writeable = False
    return perm


@dataclasses.dataclass(frozen=True)
class Stream:
    """The training stream as seen by one process."""

    num_examples: int
    global_batch: int
    seed: int
    process_index: int = 0
    process_count: int = 1

    def __post_init__(self):
        if self.num_examples <= 0 or self.global_batch <= 0:
            raise ValueError(f"need num_examples > 0 and global_batch > 0, got {self.num_examples}, "
                             f"{self.global_batch}")
        if self.global_batch % self.process_count:
            raise ValueError(f"global_batch {self.global_batch} is not divisible by process_count "
                             f"{self.process_count}")
        if not 0 <= self.process_index < self.process_count:
            raise ValueError(f"process_index {self.process_index} not in [0, {self.process_count})")

    @property
    def local_batch(self) -> int:
        return self.global_batch // self.process_count

    def position(self, step: int, slot: int) -> int:
        """Stream position of this process's ``slot``-th example of global step ``step``."""
        return step * self.global_batch + self.process_index * self.local_batch + slot

    def example(self, position: int) -> tuple[int, int]:
        """(epoch, example index) at a stream position."""
        epoch, offset = divmod(position, self.num_examples)
        return epoch, int(epoch_permutation(self.num_examples, self.seed, epoch)[offset])

    def step_examples(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """This process's (epochs, example indices) at global step ``step``, each of shape (local_batch,)."""
        pairs = [self.example(self.position(step, j)) for j in range(self.local_batch)]
        return np.array([e for e, _ in pairs], np.int64), np.array([i for _, i in pairs], np.int64)

    def epoch_at(self, step: int) -> int:
        """The epoch of the first example of global step ``step``."""
        return step * self.global_batch // self.num_examples

    def first_step(self, epoch: int) -> int:
        """The first global step that reads an example of ``epoch``."""
        return epoch * self.num_examples // self.global_batch

    def steps_per_epoch(self) -> float:
        return self.num_examples / self.global_batch

    def epoch_reads(self, epoch: int) -> dict[int, np.ndarray]:
        """What this process reads of ``epoch``: global step -> the example indices of that epoch it reads
        at that step (in order). The first and last step may also read the neighbouring epochs' examples,
        which are left out here."""
        last = ((epoch + 1) * self.num_examples - 1) // self.global_batch
        reads = {}
        for step in range(self.first_step(epoch), last + 1):
            epochs, indices = self.step_examples(step)
            reads[step] = indices[epochs == epoch]
        return reads


def eval_steps(num_examples: int, global_batch: int) -> int:
    """Global eval batches needed to read every example once (the last one padded)."""
    return -(-num_examples // global_batch)


def eval_examples(
    step: int, num_examples: int, global_batch: int, process_index: int = 0, process_count: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """This process's (example indices, mask) of eval batch ``step``: index ``k = step*B + p*B/P + j`` in
    order; past the end the index is 0 and the mask False, so padding is read but never counted."""
    if global_batch % process_count:
        raise ValueError(f"global_batch {global_batch} is not divisible by process_count {process_count}")
    local = global_batch // process_count
    k = step * global_batch + process_index * local + np.arange(local)
    mask = k < num_examples
    return np.where(mask, k, 0), mask
