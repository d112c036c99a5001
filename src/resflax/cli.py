"""``resflax`` command line: thin entry points that parse flags and call the library.

    resflax summary [MODEL ...] [--json]        parameters and multiply-adds beside the paper's
    resflax train --config=experiments/cifar10.py:resnet20 --workdir=DIR [--config.KEY=VALUE ...] [--start_over]
    resflax train --workdir=DIR                 continue a run (or fine-tune imported weights) with its config.json
                                                (resflax train --help lists every config key)
    resflax eval --workdir=DIR [--protocol=center|10crop|multiscale] [--record] [--json]
                                                test error of the latest checkpoint, with a state digest
    resflax prepare-data [--data_dir=DIR]       download and prepare CIFAR-10 (ArrayRecord) once
    resflax prepare-data --dataset imagenet2012 [--manual_dir=DIR]   ImageNet from the manual download's tars
    resflax make-tiny-imagenet --out DIR [--name N] [--num_classes C] [--train_per_class K] [--val_per_class K]
                                                a small real-photo ImageNet-like dataset (for imagenet.py:tiny)
    resflax import SOURCE --model NAME --workdir DIR   PyTorch weights (.safetensors / .pth) as a new run
    resflax export --workdir DIR --out FILE.safetensors  a run's weights in torchvision's / akamaster's names
    resflax predict --workdir DIR IMAGE...       top-5 classes of your own images
    resflax bn-stats --workdir DIR --out NEW [--batches N]   BN statistics averaged over N training batches
    resflax report RUN_DIR... --out DIR          Fig. 6 curves and the Table 6 markdown from runs
    resflax responses --workdir DIR [DIR...]     Fig. 7: std of each 3x3 layer's response (PNG + CSV)

Config files are Python, executed on load by design (like any ml-collections config): only run configs you
trust. Checkpoints are read with Orbax (no pickle).

Exit codes: 0 done (or checkpointed after SIGTERM/SIGINT), 1 internal error (traceback shown and kept in
WORKDIR/errors.log by train/import, in ~/.cache/resflax/errors/ by the others), 2 bad input / a file that could
not be written / a checkpoint that could not be restored (one line on stderr), 3 divergence, 130 interrupted
(SIGINT/SIGTERM to any other command, or a second one while training stops).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import traceback
from pathlib import Path

from absl import flags

from resflax import config_cli, xla
from resflax.errors import INTERNAL_ERROR, BadInput, ResflaxError
from resflax.interrupts import Interrupts

USAGE = __doc__

# Each command's area: the package whose commands.py holds the command's body (in the order `resflax` lists them).
AREAS = {"summary": "analysis", "train": "train", "eval": "train", "prepare-data": "data",
         "make-tiny-imagenet": "data", "import": "train", "export": "train", "predict": "train", "bn-stats": "train",
         "report": "analysis", "responses": "analysis"}


def _commands(area: str):
    """``resflax.<area>.commands``, imported when one of its commands runs (start-up time: ``resflax --help``,
    ``resflax train --help`` and a mistyped command import no JAX, Orbax or TFDS)."""
    if area == "analysis":
        from resflax.analysis import commands  # noqa: PLC0415 (start-up time, see above)
    elif area == "data":
        from resflax.data import commands  # noqa: PLC0415 (start-up time)
    else:
        from resflax.train import commands  # noqa: PLC0415 (start-up time)
    return commands


def cmd_train(argv: list[str]) -> int:
    if any(a in ("-h", "--help", "-help", "--helpfull") for a in argv):
        return config_cli.train_help(argv)

    def define(fl):
        flags.DEFINE_string("workdir", None, "run directory (checkpoints, logs)", flag_values=fl)
        flags.DEFINE_bool("start_over", False, "move an existing run in workdir aside and start fresh", flag_values=fl)

    try:
        fl, rest = config_cli.parse_config("resflax train", argv, define)
    except BadInput as e:
        return _fail(str(e))
    if rest:
        return _fail(f"unexpected arguments: {' '.join(rest)}")
    return _commands("train").run_train(fl.config, fl.workdir, fl.start_over)


def cmd_import(argv: list[str]) -> int:
    def define(fl):
        flags.DEFINE_string("workdir", None, "new run directory to write", flag_values=fl)
        flags.DEFINE_enum("layout", None, ["torchvision", "cifar"], "weight names: torchvision/timm ImageNet "
                          "models (default for ImageNet configs) or akamaster's CIFAR ResNets", flag_values=fl)
        flags.DEFINE_string("timm_config", None, "timm weights: their pretrained config (config.json)", flag_values=fl)
        flags.DEFINE_string("interpolation", None, "timm weights: pretrained_cfg interpolation", flag_values=fl)
        flags.DEFINE_float("crop_pct", None, "timm weights: pretrained_cfg crop_pct", flag_values=fl)

    if any(a in ("-h", "--help") for a in argv):
        print("usage: resflax import SOURCE (--model NAME | --config=FILE:NAME) --workdir DIR [--layout L] "
              "[--timm_config FILE] [--interpolation I] [--crop_pct P] [--config.KEY=VALUE ...]\n\nSOURCE: "
              ".safetensors, or a PyTorch .pth/.th read with torch.load(weights_only=True) (torch extra). Writes "
              "config.json and checkpoint 0: `resflax eval` and `resflax train` (fine-tuning) use it like any run. "
              "The source's evaluation preprocessing is recorded: torchvision's or akamaster's, or timm's from its "
              "config file or flags; a --config.KEY given here wins.")
        return 0
    commands = _commands("train")
    fl, rest = config_cli.parse_config("resflax import", commands.model_config(argv), define)
    if len(rest) != 1 or not fl.workdir:
        raise BadInput("usage: resflax import SOURCE --model NAME --workdir DIR")
    return commands.run_import(rest[0], fl, config_cli.given_keys(fl))


def _fail(msg: str) -> int:
    print(f"resflax: error: {msg}", file=sys.stderr)
    return 2


def _workdir_of(argv: list[str]) -> Path | None:
    for i, a in enumerate(argv):
        if a.startswith("--workdir="):
            return Path(a.split("=", 1)[1])
        if a == "--workdir" and i + 1 < len(argv):
            return Path(argv[i + 1])
    return None


WRITES_WORKDIR = ("train", "import")  # an internal error's traceback kept there; others': in the user's cache
# The commands that run JAX: they keep compiled programs in ~/.cache/resflax/xla (xla.compilation_cache). Of them,
# those that only run a forward pass and print: no training XLA flag, and `entry` ends them once that is flushed.
JAX_COMMANDS = ("train", "eval", "predict", "import", "export", "responses", "bn-stats")
FORWARD_ONLY = ("predict",)


def _error_log(cmd: str, argv: list[str]) -> Path:
    workdir = _workdir_of(argv) if cmd in WRITES_WORKDIR else None
    if workdir is not None and workdir.is_dir():
        return workdir / "errors.log"
    from resflax.configs import user_cache_dir  # noqa: PLC0415 (start-up time: configs imports ml_collections)

    return user_cache_dir() / "errors" / f"{time.strftime('%Y%m%d-%H%M%S')}-{cmd}-{os.getpid()}.log"


def _internal_error(cmd: str, argv: list[str], err: BaseException) -> int:
    """An exception nobody expected: a bug, or a failure inside JAX/XLA/Orbax. Never called bad input."""
    text = "".join(traceback.format_exception(err))
    sys.stderr.write(text)
    kept = ""
    try:
        log = _error_log(cmd, argv)
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as f:
            f.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} resflax {cmd} {' '.join(argv)}\n{text}")
        kept = f"; traceback also in {log}"
    except OSError:
        pass
    first = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
    print(f"resflax: internal error: {type(err).__name__}{': ' + first if first else ''} (a bug or a failure "
          f"inside JAX/XLA, not bad input{kept})", file=sys.stderr)
    return INTERNAL_ERROR


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd not in AREAS:
        return _fail(f"unknown command {cmd!r}; expected one of {', '.join(AREAS)}")
    try:
        # SIGTERM as SIGINT: "interrupted", exit 130 (train, import and bn-stats take them in hand while they write);
        # an interrupt Python dropped on the way (resflax.interrupts) still ends the command as interrupted
        with Interrupts(defer=False) as interrupts:
            if cmd in JAX_COMMANDS and not any(a in ("-h", "--help", "-help", "--helpfull") for a in rest):
                xla.configure(training=cmd not in FORWARD_ONLY)  # the YNN flag: faster training, slower forward
                xla.compilation_cache()  # before anything compiles (RESFLAX_COMPILATION_CACHE=0: off)
            run = {"train": cmd_train, "import": cmd_import}.get(cmd) or _commands(AREAS[cmd]).COMMANDS[cmd]
            rc = run(rest)
            interrupts.check()
            return rc
    except ResflaxError as e:
        _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
        return e.exit_code
    except OSError as e:
        if e.filename is None:
            return _internal_error(cmd, rest, e)
        return _fail(f"{e.strerror or e}: {e.filename}")  # a path the user named cannot be read or written
    except KeyboardInterrupt:
        _fail("interrupted")
        return 130
    except Exception as e:  # noqa: BLE001
        return _internal_error(cmd, rest, e)


def entry() -> None:
    """The ``resflax`` console command (and ``python -m resflax.cli``): ``main``, then the exit, without the teardown
    after a FORWARD_ONLY command (0.2-0.4 s of a warm predict, docs/performance.md); ``main`` itself returns."""
    rc = main(sys.argv[1:])
    if sys.argv[1:2] and sys.argv[1] in FORWARD_ONLY:
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: the ordinary exit says so, as Python does
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(rc)
    sys.exit(rc)


if __name__ == "__main__":
    entry()
