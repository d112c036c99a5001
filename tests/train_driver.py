"""``resflax train ARGS...`` on TFDS mock data, in its own process (for kill/signal/multi-process tests).

    python tests/train_driver.py --config=experiments/cifar10.py:resnet8 --workdir=DIR [--config.KEY=V ...]

``RESFLAX_MOCK_EXAMPLES`` (default 64) sets the size of each mock split; the mock data is the same in every
process (TFDS generates it from a fixed seed), so processes of one multi-process run agree.
"""

import os
import sys

import tensorflow_datasets as tfds

from resflax import cli


def main() -> int:
    n = int(os.environ.get("RESFLAX_MOCK_EXAMPLES", "64"))
    with tfds.testing.mock_data(num_examples=n, policy=tfds.testing.MockPolicy.USE_CODE):
        return cli.main(["train", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
