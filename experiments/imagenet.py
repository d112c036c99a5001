r"""ImageNet with the paper's recipe (He et al. 2015, Sec. 3.4) for its plain and residual nets (Tables 2-4).

    resflax train --config=experiments/imagenet.py:resnet50 --workdir=runs/imagenet-resnet50
    make imagenet-resnet50                    # the same, into runs/imagenet-resnet50/

Models: Table 2 (10-crop top-1): plain-18 27.94, plain-34 28.54, ResNet-18 27.88, ResNet-34 25.03, all with
option A shortcuts (``plain18``, ``plain34``, ``resnet18``, ``resnet34``). Table 3: ResNet-34 with option
A/B/C (``resnet34,shortcut=B``), ResNet-50/101/152 with option B (``resnet50``, ...: 22.85 / 21.75 / 21.43).
The stride of a downsampling bottleneck is on its first 1x1 conv as in the paper (v1);
``--config.stride_on_3x3=True`` gives the v1.5 variant of torchvision's weights.

Recipe: batch 256, SGD momentum 0.9, weight decay 1e-4, lr 0.1 divided by 10 "when the error plateaus", up
to 60x10^4 iterations, no dropout. Input: shorter side uniform in [256, 480], a random 224x224 crop, a
horizontal flip, the per-pixel mean subtracted, AlexNet's PCA lighting (alpha ~ N(0, 0.1)); evaluation on
the centre 224 crop of the 256-resized validation image during training (10-crop and multi-scale testing are
protocols of ``resflax eval``).

**The plateau rule.** The paper gives no schedule. The default is fixed: lr divided by 10 at 150k, 300k and
450k iterations, the end at 600k. Why: 600k iterations of 256 images are 120 epochs of the 1.28M training
images (5,005 iterations per epoch), and the drops every 30 epochs are the schedule of fb.resnet.torch,
Facebook AI Research's reimplementation of the paper (by Sam Gross and Michael Wilber, not the paper's
authors); a plateau of the validation error is in practice reached after
~30 epochs at each lr. ``lr_schedule="plateau"`` decides the drops from the data instead: it holds out
``val_examples`` training images and divides the lr when their top-1 error has not improved by
``plateau_min_delta`` points for ``plateau_patience`` evaluations in a row (``eval_every_steps``: once per
epoch by default), at most ``plateau_max_drops`` times; the drops are recorded in metrics.jsonl and in every
checkpoint, so a resumed run continues identically.

**BatchNorm in groups of 32** (``bn_group_size=32``). The paper trained with 256 images per iteration (Sec.
3.4) spread over 8 GPUs, each GPU's BatchNorm normalising its own 32 images (Goyal et al. 2017, "Accurate,
Large Minibatch SGD", He among the authors, describe this ResNet-50 baseline: 8 workers of n = 32, BN
statistics per worker); BN over all 256 images is a different, less noisy regulariser. So each group of 32
consecutive images of the batch is normalised by its own statistics, on any number of devices: on one device
the 256 images form 8 groups, on 8 devices each device's slice is a group, on 16 devices a group spans two.
The running averages follow the mean of the groups' statistics. After training, ``resflax bn-stats`` replaces
them by an average over many training batches, the way the released Caffe models' statistics were made.
``bn_group_size=0`` gives per-device statistics, ``bn_sync=True`` the whole batch.

Large batches (pods): ``lr_scaling="linear"`` makes the lr ``base_lr * batch_size / 256`` and
``lr_warmup_steps`` ramps it linearly from ~0 over that many steps (Goyal et al. 2017: 5 epochs).

``vgg16``/``vgg19`` (the Fig. 3 / Table 3 baselines) train with their own paper's settings: lr 0.01, weight
decay 5e-4, dropout 0.5 in the first two FC layers, scale jitter [256, 512]; the ResNets' schedule otherwise.

Arguments after ``:``: the model, then ``key=value`` settings named like the config keys they set:
``seed``, ``shortcut``, ``val_examples``, ``schedule_scale`` (multiplies every step count of the schedule).
``:tiny`` is a CPU-sized run (ResNet-18 at 112 px, 30 steps) on the small real-photo dataset that
``resflax make-tiny-imagenet --out DIR`` writes; give it ``--config.data_dir=DIR``. Data: see the README
(``resflax prepare-data --dataset imagenet2012``).
"""

import ml_collections

from resflax import configs
from resflax.configs import parse_arg

TABLE2 = ("plain18", "plain34", "resnet18", "resnet34")  # option A in the paper's Table 2


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The base config (``resflax.configs.KEYS``, with the ImageNet keys) with this recipe's settings."""
    a = parse_arg(arg or "resnet50", model="resnet50", seed=0, shortcut="", val_examples=0, schedule_scale=1.0)
    tiny = a.model == "tiny"
    model = "resnet18" if tiny else a.model
    c = configs.build(
        "imagenet", model=model, shortcut=a.shortcut or ("A" if model in TABLE2 else "B"), dataset="imagenet2012",
        seed=a.seed, val_examples=a.val_examples, schedule_scale=a.schedule_scale,
        batch_size=256, eval_batch_size=250, num_steps=600_000, bn_group_size=32,  # the paper's 8 GPUs' BN
        lr_boundaries=(150_000, 300_000, 450_000),  # the fixed schedule: epochs 30, 60, 90 of 120
        checkpoint_every_steps=5000, log_every_steps=100)
    if model.startswith("vgg"):  # VGG's own paper's settings
        c.update(base_lr=0.01, weight_decay=5e-4, scale_range=(256, 512))
    if tiny:  # a CPU-sized run on `resflax make-tiny-imagenet`'s dataset
        c.update(dataset="resflax_tiny_jpeg", scale_range=(128, 240), image_size=112, eval_resize=128,
                 multiscale_scales=(112, 128, 192, 240, 320), loader_workers=0, batch_size=16, eval_batch_size=16,
                 bn_group_size=8,  # two BN groups per batch, as the full recipe's 8 groups of 32
                 num_steps=30, lr_boundaries=(15, 25), checkpoint_every_steps=10, eval_every_steps=10,
                 log_every_steps=5)
    return c
