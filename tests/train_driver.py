"""``resflax train ARGS...`` on TFDS mock data, in its own process (for kill/signal/multi-process tests).

    python tests/train_driver.py --config=experiments/cifar10.py:resnet8 --workdir=DIR [--config.KEY=V ...]

``RESFLAX_MOCK_EXAMPLES`` (default 64) sets the size of each mock split; the mock data is the same in every
process (TFDS generates it from a fixed seed), so processes of one multi-process run agree.
"""

import os
import sys

import tensorflow_datasets as tfds

from resflax import cli


def _cache_every_process() -> None:
    """JAX writes persistent-compilation-cache entries from process 0 only, and the programs of process 1 of
    a 2-process test run (its own device) have keys of their own: without this every start of process 1
    compiles its ~90 programs again (~15 s of each multi-process test start on 2 cores). Test-only: the
    entries are the executables process 1 compiled itself, so a cache hit runs the same program."""
    try:
        from jax._src import compilation_cache, compiler, distributed  # noqa: PLC0415
    except ImportError:
        return
    original = getattr(compiler, "_cache_write", None)
    if original is None or not hasattr(compilation_cache, "put_executable_and_time"):
        return

    # JAX 0.10 passes the program's host callbacks last (it caches no program that has any); 0.12 no longer does
    def write(cache_key, compile_time_secs, module_name, backend, executable, *host_callbacks):
        if distributed.global_state.process_id in (None, 0) or any(host_callbacks):
            return original(cache_key, compile_time_secs, module_name, backend, executable, *host_callbacks)
        compilation_cache.put_executable_and_time(cache_key, module_name, executable, backend,
                                                  int(compile_time_secs))

    compiler._cache_write = write


def main() -> int:
    _cache_every_process()
    n = int(os.environ.get("RESFLAX_MOCK_EXAMPLES", "64"))
    with tfds.testing.mock_data(num_examples=n, policy=tfds.testing.MockPolicy.USE_CODE):
        return cli.main(["train", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
