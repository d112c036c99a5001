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
    resflax report RUN_DIR... --out DIR          Fig. 6 curves and the Table 6 markdown from runs
    resflax responses --workdir DIR [DIR...]     Fig. 7: std of each 3x3 layer's response (PNG + CSV)

Config files are Python, executed on load by design (like any ml-collections config): only run configs you
trust. Checkpoints are read with Orbax (no pickle).

Exit codes: 0 done (or checkpointed after SIGTERM/SIGINT), 1 internal error (traceback shown and kept in
WORKDIR/errors.log by train/import, in ~/.cache/resflax/errors/ by the others), 2 bad input / a file that could
not be written / a checkpoint that could not be restored (one line on stderr), 3 divergence, 130 a second interrupt.
"""

from __future__ import annotations

import os
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from absl import flags

from resflax.errors import INTERNAL_ERROR, BadInput, ResflaxError

USAGE = __doc__

# Each command's area: the package whose commands.py holds the command's body (in the order `resflax` lists them).
AREAS = {"summary": "analysis", "train": "train", "eval": "train", "prepare-data": "data",
         "make-tiny-imagenet": "data", "import": "train", "export": "train", "predict": "train",
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


TRAIN_USAGE = """usage: resflax train --config=FILE[:ARG] --workdir=DIR [--config.KEY=VALUE ...] [--start_over]

Trains (or resumes: rerun the same command) the run in DIR. FILE[:ARG] is an experiment config, e.g.
experiments/cifar10.py:resnet110,seed=3,val_examples=5000,schedule_scale=0.1; every key below can be
overridden with --config.KEY=VALUE (a misspelt key is an error).

  --config       experiment config file and its argument
  --workdir      run directory: checkpoints/, metrics.jsonl, tb/, config.json
  --start_over   move an existing run in DIR aside (DIR.old-<time>) and start fresh
"""

_KEY_LINE = re.compile(r"^\s*c\.(\w+(?:\.\w+)*)\s*=.*?#\s*(.*)$")


def _key_help(path: Path) -> dict[str, str]:
    """The trailing comment of each ``c.KEY = ...  # comment`` line of a config file: the help of keys that
    ``resflax.configs.KEYS`` does not define (a config file of one's own)."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    return {m.group(1): m.group(2) for ln in lines if (m := _KEY_LINE.match(ln))}


def _print_keys(values: dict[str, Any], helps: dict[str, str], width: int = 0) -> None:
    width = width or max((len(k) for k in values), default=0)
    for key, value in values.items():
        note = f"  # {helps[key]}" if helps.get(key) else ""
        print(f"  --config.{key:<{width}} = {value!r}{note}")


def _train_help(argv: list[str]) -> int:
    """``resflax train --help``: the keys of ``--config``'s experiment with its values, or (without it) every
    key of ``resflax.configs.KEYS`` with the base defaults, by experiment."""
    # start-up time: only `train`/`import` parse config flags (absl, ml_collections)
    from absl import flags  # noqa: PLC0415
    from ml_collections import config_flags  # noqa: PLC0415

    from resflax import configs  # noqa: PLC0415 (start-up time, as above)

    print(TRAIN_USAGE)
    helps = {k.name: k.help for k in configs.KEYS.values()}
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if spec is None:
        print("config keys with the base config's defaults (resflax.configs.KEYS); an experiment overrides some\n"
              "(ImageNet's batch_size is 256, ...): `resflax train --help --config=FILE[:ARG]` lists the keys of\n"
              "an experiment with its values.\n\nevery experiment's:")
        width = max(len(k) for k in configs.KEYS)
        _print_keys({k.name: k.default for k in configs.keys_of(None) if k.only is None}, helps, width)
        for name, path in configs.EXPERIMENTS.items():
            print(f"\nonly in {path} (resflax train --help --config={path}):")
            _print_keys({k.name: k.default for k in configs.keys_of(None) if k.only == name}, helps, width)
        return 0
    path = Path(spec.split(":", 1)[0])
    fl = flags.FlagValues()
    argv0 = ["resflax train", f"--config={spec}"]
    config_flags.DEFINE_config_file("config", None, "", lock_config=True, flag_values=fl, sys_argv=argv0)
    try:
        fl(argv0)
        config = fl.config.to_dict()
    except Exception as e:  # noqa: BLE001 (help must not crash on a broken config)
        raise BadInput(f"cannot load config {spec}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") \
            from None
    print(f"config keys of {spec} (default values):")
    flat = {}
    for key, value in config.items():  # nested groups (population) as population.seeds, ...
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    _print_keys(flat, {**_key_help(path), **helps})
    return 0


def _parse_config(prog: str, argv: list[str], define) -> tuple[Any, list[str]]:
    """absl flags with an ml-collections ``--config`` file (and ``--config.KEY=VALUE`` overrides) plus the
    flags ``define(fl)`` adds; returns (flag values, positional arguments). Bad flags or a config that does
    not load raise ``BadInput`` with one line."""
    # start-up time: only `train`/`import` parse config flags (absl, ml_collections)
    from absl import flags  # noqa: PLC0415
    from ml_collections import config_flags  # noqa: PLC0415

    fl = flags.FlagValues()
    full_argv = [prog, *argv]
    # sys_argv: the --config.KEY overrides are read from this argv, not from sys.argv, so that
    # main(["train", ..., "--config.batch_size=16"]) works from Python.
    config_flags.DEFINE_config_file("config", None, "experiment config file[:arg]", lock_config=True, flag_values=fl,
                                    sys_argv=full_argv)
    define(fl)
    try:
        rest = fl(full_argv)
        if fl.config is not None:
            fl.config.to_dict()  # a config file that failed to load raises on first use
    except flags.Error as e:
        raise BadInput(str(e).splitlines()[0]) from None
    except OSError as e:  # the config file is missing or unreadable: name it
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise BadInput(f"bad config: {next((ln for ln in lines if 'Errno' in ln), lines[0] if lines else e)}") from None
    except (ValueError, KeyError, AttributeError, TypeError) as e:
        raise BadInput(_unknown_key(e, argv) or
                       f"bad config: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return fl, rest[1:]


_NO_KEY = re.compile(r"""^'(?P<key>[^']+)'(?:\nDid you mean "(?P<near>[^"]+)" instead of "[^"]+"\?)?$""")


def _unknown_key(err: Exception, argv: list[str]) -> str | None:
    """One line for a ``--config.KEY=VALUE`` whose KEY the config lacks (ml-collections' KeyError names the
    missing part, with a close match on a second line), naming the whole key and the close match; None for
    any other error."""
    if isinstance(err, AttributeError) and err.args and isinstance(err.args[0], KeyError):
        err = err.args[0]  # ConfigDict's attribute access wraps the KeyError
    text = err.args[0] if isinstance(err, KeyError) and err.args else None
    m = _NO_KEY.match(text) if isinstance(text, str) else None
    if m is None:
        return None
    for a in argv:
        if not a.startswith("--config."):
            continue
        parts = a[len("--config."):].split("=", 1)[0].split(".")
        if m["key"] in parts:
            i = parts.index(m["key"])
            key = ".".join(parts)
            near = f" (did you mean {'.'.join([*parts[:i], m['near'], *parts[i + 1:]])!r}?)" if m["near"] else ""
            return f"unknown config key {key!r}{near}"
    return None


def cmd_train(argv: list[str]) -> int:
    if any(a in ("-h", "--help", "-help", "--helpfull") for a in argv):
        return _train_help(argv)

    def define(fl):
        flags.DEFINE_string("workdir", None, "run directory (checkpoints, logs)", flag_values=fl)
        flags.DEFINE_bool("start_over", False, "move an existing run in workdir aside and start fresh",
                          flag_values=fl)

    try:
        fl, rest = _parse_config("resflax train", argv, define)
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

    if any(a in ("-h", "--help") for a in argv):
        print("usage: resflax import SOURCE (--model NAME | --config=FILE:NAME) --workdir DIR [--layout L] "
              "[--config.KEY=VALUE ...]\n\nSOURCE: .safetensors, or a PyTorch .pth/.th read with "
              "torch.load(weights_only=True) (torch extra). Writes config.json and checkpoint 0: `resflax eval` "
              "and `resflax train` (fine-tuning) use it like any run.")
        return 0
    commands = _commands("train")
    fl, rest = _parse_config("resflax import", commands.model_config(argv), define)
    if len(rest) != 1 or not fl.workdir:
        raise BadInput("usage: resflax import SOURCE --model NAME --workdir DIR")
    return commands.run_import(rest[0], fl.config, fl.workdir, fl.layout)


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


# train and import write their workdir: an internal error's traceback is kept in WORKDIR/errors.log. The other
# commands write nothing where they read (eval, export, predict, report, responses): it goes to the user's cache.
WRITES_WORKDIR = ("train", "import")


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
        run = {"train": cmd_train, "import": cmd_import}.get(cmd) or _commands(AREAS[cmd]).COMMANDS[cmd]
        return run(rest)
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


if __name__ == "__main__":
    sys.exit(main())
