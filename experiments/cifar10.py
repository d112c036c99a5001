r"""CIFAR-10 with the paper's recipe (He et al. 2015, Sec. 4.2) for any of its plain or residual nets.

    resflax train --config=experiments/cifar10.py:resnet110 --workdir=runs/cifar-resnet110
    make cifar-resnet110                      # the same, into runs/cifar-resnet110/

The paper's test errors (Table 6): ResNet-20 8.75, -32 7.51, -44 7.17, -56 6.97, -110 6.43 (best of 5;
6.61 +- 0.16), -1202 7.93. Plain nets appear only as curves (Fig. 6): deeper plain nets train worse.

Recipe: batch 128, SGD momentum 0.9, weight decay 1e-4 (on every parameter, as Caffe/torch reproductions),
lr 0.1 divided by 10 at 32k and 48k iterations, stop at 64k; per-pixel mean subtraction, 4-pixel zero
padding + random 32x32 crop + horizontal flip; ResNet-110/1202 start at lr 0.01 until the (smoothed)
training error is below 80%, then go back to 0.1. BN statistics per device (the paper's two GPUs) unless
``bn_sync``.

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

from resflax.configs import parse_arg

WARMUP_MODELS = ("resnet110", "resnet1202")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg or "resnet20", model="resnet20", seed=0, val_examples=0, schedule_scale=1.0)
    c = ml_collections.ConfigDict()
    runlocal = a.model == "runlocal"
    c.model = "resnet20" if runlocal else a.model
    # ResNet fields that may be overridden (see resflax.models.ResNet); None keeps the model's default.
    c.shortcut = ml_collections.config_dict.placeholder(str)
    c.pad_layout = "append"  # option-A zero channels after the real ones (fb.resnet.torch); "split" = akamaster
    c.stride_on_3x3 = False
    c.zero_init_last_bn = False
    c.impl = ml_collections.config_dict.placeholder(str)  # layer implementation: "fast" (default) or "flax"
    # stages with at least this many blocks run as one lax.scan (compile time flat in depth); None keeps the
    # model's default (64: only ResNet-1202 scans), 0 unrolls every stage
    c.scan_min_blocks = ml_collections.config_dict.placeholder(int)
    c.dtype = "float32"  # compute dtype; "bfloat16" keeps float32 parameters and BN statistics

    c.dataset = "cifar10"
    c.data_dir = ml_collections.config_dict.placeholder(str)  # else $TFDS_DATA_DIR, ~/tensorflow_datasets
    c.mean_cache_dir = ml_collections.config_dict.placeholder(str)  # decoded-data cache; None: ~/.cache/resflax
    c.val_examples = a.val_examples  # training images held out as a validation split; 0 = none (train on 50k)
    # input normalisation: "pixel" = the per-pixel training mean (the paper); "channel" = the per-channel mean
    # (0.485, 0.456, 0.406), with std dividing after it (imported akamaster weights set both)
    c.mean = "pixel"
    c.std = ml_collections.config_dict.placeholder(tuple)

    c.seed = a.seed  # fixes initialisation, data order and augmentation
    c.batch_size = 128  # global batch, split over the devices
    c.eval_batch_size = 500
    # multiplies num_steps and lr_boundaries (1.0 = the paper's 64k schedule); runlocal: 64k * 0.0094 ~ 600
    c.schedule_scale = 0.0094 if runlocal else a.schedule_scale
    c.num_steps = 64_000  # the end (before schedule_scale); smaller alone = stop early, boundaries unchanged
    c.base_lr = 0.1
    c.lr_boundaries = (32_000, 48_000)
    c.lr_factor = 0.1
    c.momentum = 0.9
    c.weight_decay = 1e-4
    c.weight_decay_on = "all"  # or "kernels" (conv/fc kernels only)
    c.warmup = c.model in WARMUP_MODELS  # ResNet-110/1202: lr warmup_lr until training error < warmup_until_error
    c.warmup_lr = 0.01
    c.warmup_until_error = 0.8

    # Population: several networks of one depth trained in one compiled program (resflax.train.population),
    # one per (residual flag, seed): e.g. --config.population.seeds=0,1,2,3,4 --config.population.residual=0,1
    # trains plain-n and ResNet-n (n from `model`) with 5 seeds each. Empty = one network (model, seed).
    # Each member gets its own run directory WORKDIR/members/<model>-seed<s> (eval, report, responses work on
    # it, or on WORKDIR for all members). vectorize: "vmap" (fast on GPU/TPU), "loop" (each member exactly its
    # single run, bit for bit on the CPU), "auto" (loop on the CPU, vmap elsewhere).
    c.population = ml_collections.ConfigDict()
    c.population.seeds = ()  # one member per seed (and per residual flag); () = the config's seed alone
    c.population.residual = ()  # 0 = plain, 1 = residual, 0,1 = both; () = the model's own kind
    c.population.vectorize = "auto"  # "loop" (bitwise the single runs on CPU), "vmap" (fast on GPU/TPU), "auto"

    c.bn_sync = False  # True: BN statistics over the global batch (identical for any device count)
    c.num_devices = 0  # devices to use; 0 = all

    # Multi-process (one process per host): "auto" lets JAX detect TPU pods/SLURM; or give the coordinator
    # explicitly (also from RESFLAX_COORDINATOR, RESFLAX_NUM_PROCESSES, RESFLAX_PROCESS_ID). None: one process.
    c.distributed = ml_collections.config_dict.placeholder(str)
    c.coordinator_address = ml_collections.config_dict.placeholder(str)  # "host:port" of process 0
    c.num_processes = ml_collections.config_dict.placeholder(int)
    c.process_id = ml_collections.config_dict.placeholder(int)
    c.preemption_check_every_steps = 10  # several processes agree on a signal's stop step every N steps
    c.peer_timeout_s = 30  # a process silent this long is dead: the others stop (exit 2) instead of hanging

    c.checkpoint_every_steps = 1000  # also at the end and on SIGTERM/SIGINT
    c.keep_checkpoints = 3  # the newest N are kept (>= 1)
    c.eval_every_steps = 0  # test (and val) error every N steps; 0 = once per epoch
    c.log_every_steps = 50  # a training record in metrics.jsonl / TensorBoard every N steps
    c.progress = True  # tqdm progress bar
    return c
