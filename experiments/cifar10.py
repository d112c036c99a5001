r"""CIFAR-10 with the paper's recipe (He et al. 2015, Sec. 4.2) for any of its plain or residual nets.

    resflax train --config=experiments/cifar10.py:resnet110 --workdir=runs/cifar-resnet110
    make cifar-resnet110                      # the same, into runs/cifar-resnet110/

The paper's test errors (Table 6): ResNet-20 8.75, -32 7.51, -44 7.17, -56 6.97, -110 6.43 (best of 5;
6.61 +- 0.16), -1202 7.93. Plain nets appear only as curves (Fig. 6): deeper plain nets train worse.

Recipe: batch 128, SGD momentum 0.9, weight decay 1e-4 (on every parameter, as Caffe/torch reproductions),
lr 0.1 divided by 10 at 32k and 48k iterations, stop at 64k; per-pixel mean subtraction, 4-pixel zero
padding + random 32x32 crop + horizontal flip; ResNet-110/1202 start at lr 0.01 until the (smoothed)
training error is below 80%, then go back to 0.1. BN statistics per device (the paper's two GPUs: 64 images
each) unless ``bn_sync`` (the whole batch) or ``bn_group_size`` (groups of that many images on any device count;
``bn_group_size=64`` is the paper's two GPUs on any device count).

The argument after ``:`` is the model, optionally followed by typed settings named like the config keys
they set: ``experiments/cifar10.py:resnet56,seed=3,val_examples=5000,schedule_scale=0.1``
(``val_examples``: hold out that many training images as a validation split, the paper's 45k/5k is
``val_examples=5000``; ``schedule_scale``: multiply every step count of the schedule, the lr boundaries and
the end, 1.0 = paper). ``:runlocal`` is a CPU-sized smoke run (ResNet-20, 600 steps, scaled schedule).
Every key is overridable on the command line, e.g. ``--config.schedule_scale=0.05``; a misspelt key is an
error; ``resflax train --help`` lists them. ``num_steps`` alone only ends a run early (the lr boundaries
stay where they are, and a larger ``num_steps`` later resumes it): use ``schedule_scale`` for a shorter
schedule.
"""

import ml_collections

from resflax import configs
from resflax.configs import parse_arg

WARMUP_MODELS = ("resnet110", "resnet1202")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The base config (``resflax.configs.KEYS``: its defaults are this recipe) with the model and the
    argument's settings; the keys of CIFAR-10 experiments (the population group, none of ImageNet's input)."""
    a = parse_arg(arg or "resnet20", model="resnet20", seed=0, val_examples=0, schedule_scale=1.0)
    runlocal = a.model == "runlocal"
    model = "resnet20" if runlocal else a.model
    return configs.build(
        "cifar10", model=model, seed=a.seed, val_examples=a.val_examples,
        schedule_scale=0.0094 if runlocal else a.schedule_scale,  # runlocal: 64k * 0.0094 ~ 600 steps
        warmup=model in WARMUP_MODELS)  # ResNet-110/1202: lr 0.01 until the training error is below 80%
