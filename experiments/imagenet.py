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
images (5,005 iterations per epoch), and the drops every 30 epochs are fb.resnet.torch's schedule, the one
its authors' own reimplementation used; a plateau of the validation error is in practice reached after
~30 epochs at each lr. ``lr_schedule="plateau"`` decides the drops from the data instead: it holds out
``val_examples`` training images and divides the lr when their top-1 error has not improved by
``plateau_min_delta`` points for ``plateau_patience`` evaluations in a row (``eval_every_steps``: once per
epoch by default), at most ``plateau_max_drops`` times; the drops are recorded in metrics.jsonl and in every
checkpoint, so a resumed run continues identically.

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

from resflax.configs import parse_arg

TABLE2 = ("plain18", "plain34", "resnet18", "resnet34")  # option A in the paper's Table 2


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg or "resnet50", model="resnet50", seed=0, shortcut="", val_examples=0, schedule_scale=1.0)
    tiny = a.model == "tiny"
    c = ml_collections.ConfigDict()
    c.model = "resnet18" if tiny else a.model
    # A: zero-padding shortcuts; B: projections where the shape changes; C: projections everywhere
    c.shortcut = a.shortcut or ("A" if c.model in TABLE2 else "B")
    c.pad_layout = "append"  # option A: zero channels after the real ones
    c.stride_on_3x3 = False  # False: v1 (the paper); True: v1.5 (torchvision's weights)
    c.zero_init_last_bn = False
    c.impl = ml_collections.config_dict.placeholder(str)  # layer implementation: "fast" (default) or "flax"
    c.scan_min_blocks = ml_collections.config_dict.placeholder(int)  # see experiments/cifar10.py
    c.dtype = "float32"  # compute dtype; "bfloat16" keeps float32 parameters and BN statistics
    c.num_classes = ml_collections.config_dict.placeholder(int)  # None: the dataset's

    # Data: a TFDS dataset of encoded images with train/validation splits, read as ArrayRecord.
    c.dataset = "resflax_tiny_jpeg" if tiny else "imagenet2012"
    c.data_dir = ml_collections.config_dict.placeholder(str)  # else $TFDS_DATA_DIR, ~/tensorflow_datasets
    c.val_examples = a.val_examples  # training images held out (the plateau rule watches them); 0 = none
    c.crop = "scale"  # "scale": the paper's [256, 480] scale augmentation; "inception": random-resized crop
    # shorter side before the crop, uniform, inclusive
    c.scale_range = (128, 240) if tiny else (256, 512) if a.model.startswith("vgg") else (256, 480)
    c.image_size = 112 if tiny else 224  # crop side
    c.eval_resize = 128 if tiny else 256  # evaluation: shorter side, then the centre crop
    c.flip = True
    c.lighting_std = 0.1  # AlexNet PCA lighting, alpha ~ N(0, lighting_std); 0 = off
    c.draft = True  # let libjpeg downscale in the DCT domain when the target is <= half the stored size
    c.resample = "bilinear"  # or "bicubic"
    c.mean = "pixel"  # "pixel": per-pixel mean image of training crops (cached); "channel": per-channel mean
    # resflax eval --protocol=multiscale: shorter sides of the fully-convolutional test (the paper's five)
    c.multiscale_scales = (112, 128, 192, 240, 320) if tiny else (224, 256, 384, 480, 640)
    # divide by this per-channel std after subtracting the mean: None (the paper); imported torchvision/timm
    # weights set (0.229, 0.224, 0.225) with mean="channel" (their normalisation travels with them)
    c.std = ml_collections.config_dict.placeholder(tuple)
    c.mean_images = 10_000  # training images averaged for the per-pixel mean
    c.mean_cache_dir = ml_collections.config_dict.placeholder(str)  # None: $XDG_CACHE_HOME/resflax or ~/.cache/resflax
    c.loader_workers = 0 if tiny else -1  # grain worker processes per host; -1: one per core but one (<= 32)
    c.loader_threads = 0  # extra reader threads per worker (Pillow releases the GIL)

    c.seed = a.seed  # fixes initialisation, data order and augmentation
    c.batch_size = 16 if tiny else 256  # global batch, split over processes and devices
    c.eval_batch_size = 16 if tiny else 250
    c.schedule_scale = a.schedule_scale  # multiplies num_steps, lr_boundaries and lr_warmup_steps
    c.num_steps = 30 if tiny else 600_000
    vgg = c.model.startswith("vgg")
    c.base_lr = 0.01 if vgg else 0.1
    c.lr_schedule = "fixed"  # "fixed": drops at lr_boundaries; "plateau": drops when the held-out error stalls
    c.lr_boundaries = (15, 25) if tiny else (150_000, 300_000, 450_000)  # fixed schedule: epochs 30, 60, 90
    c.lr_factor = 0.1
    c.plateau_patience = 3  # evaluations without improvement before a drop
    c.plateau_min_delta = 0.1  # improvement (top-1 points) that counts
    c.plateau_max_drops = 3
    c.lr_scaling = "none"  # "linear": lr = base_lr * batch_size / lr_reference_batch
    c.lr_reference_batch = 256
    c.lr_warmup_steps = 0  # gradual linear warm-up (steps, before schedule_scale); 0 = none
    c.momentum = 0.9
    c.weight_decay = 5e-4 if vgg else 1e-4
    c.weight_decay_on = "all"  # or "kernels" (conv/fc kernels only)
    c.warmup = False  # the CIFAR ResNet-110 rule; not used on ImageNet (see lr_warmup_steps)
    c.warmup_lr = 0.01
    c.warmup_until_error = 0.8

    c.bn_sync = False  # True: BN statistics over the global batch; False: per device (as the paper's GPUs)
    c.num_devices = 0  # devices to use; 0 = all
    c.distributed = ml_collections.config_dict.placeholder(str)  # see experiments/cifar10.py
    c.coordinator_address = ml_collections.config_dict.placeholder(str)
    c.num_processes = ml_collections.config_dict.placeholder(int)
    c.process_id = ml_collections.config_dict.placeholder(int)
    c.preemption_check_every_steps = 10
    c.peer_timeout_s = 30

    c.checkpoint_every_steps = 10 if tiny else 5000  # also at the end and on SIGTERM/SIGINT
    c.keep_checkpoints = 3
    c.eval_every_steps = 10 if tiny else 0  # 0 = once per epoch
    c.log_every_steps = 5 if tiny else 100
    c.progress = True
    return c
