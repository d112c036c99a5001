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
WORKDIR/errors.log), 2 bad input / a file that could not be written / a checkpoint that could not be
restored (one line on stderr), 3 divergence, 130 a second interrupt.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from resflax.errors import INTERNAL_ERROR, BadInput, ResflaxError

USAGE = __doc__


def _fmt_int(n) -> str:
    return f"{n:,}" if n is not None else "-"


def cmd_summary(argv: list[str]) -> int:
    from resflax.analysis.counts import summary  # noqa: PLC0415
    from resflax.models import available_models  # noqa: PLC0415

    ap = ArgumentParser(prog="resflax summary", description="parameters and multiply-adds per image")
    ap.add_argument("models", nargs="*", help="model names (default: every named model)")
    ap.add_argument("--json", action="store_true", help="one JSON object per model (a list if several)")
    args = ap.parse_args(argv)
    names = args.models or available_models()
    rows = [summary(n) for n in names]
    if args.json:
        print(json.dumps(rows[0] if len(rows) == 1 else rows, indent=None))
        return 0
    print(f"{'model':<12}{'params':>13}{'paper params':>14}{'mult-adds':>12}{'paper':>9}{'diff':>8}")
    for r in rows:
        ma, pma = r["mult_adds"], r["paper_mult_adds"]
        diff = f"{100 * (ma - pma) / pma:+.1f}%" if pma else "-"
        pma_s = f"{pma / 1e9:.1f}G" if pma else "-"
        print(f"{r['model']:<12}{_fmt_int(r['params']):>13}{_fmt_int(r['paper_params']):>14}"
              f"{ma / 1e9:>11.3f}G{pma_s:>9}{diff:>8}")
    return 0


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
    from absl import flags  # noqa: PLC0415
    from ml_collections import config_flags  # noqa: PLC0415

    from resflax import configs  # noqa: PLC0415

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
    from absl import flags  # noqa: PLC0415

    def define(fl):
        flags.DEFINE_string("workdir", None, "run directory (checkpoints, logs)", flag_values=fl)
        flags.DEFINE_bool("start_over", False, "move an existing run in workdir aside and start fresh",
                          flag_values=fl)

    try:
        fl, rest = _parse_config("resflax train", argv, define)
    except BadInput as e:
        return _fail(str(e))
    config = fl.config
    if rest:
        return _fail(f"unexpected arguments: {' '.join(rest)}")
    if config is None and fl.workdir and (Path(fl.workdir) / "config.json").exists():
        from resflax.train.evaluate import load_config  # noqa: PLC0415

        config = load_config(fl.workdir)  # continue the run (e.g. imported weights) with its own settings
        print(f"settings from {Path(fl.workdir) / 'config.json'}")
    if config is None or fl.workdir is None:
        return _fail("--config and --workdir are required (--config may be left out to continue a run)")
    from resflax.train.loop import train_and_evaluate  # noqa: PLC0415

    result = train_and_evaluate(config, fl.workdir, start_over=fl.start_over)
    if "members" in result:  # a population: one line per member
        for m in result["members"]:
            if m["status"] == "diverged":
                print(f"{m['name']}: diverged (stopped at step {m['step']}; see {m['dir']}/metrics.jsonl)")
            elif result["finished"] and m["test_error"] is not None:
                print(f"{m['name']}: final test error: {m['test_error']:.2f}% (step {m['step']}, "
                      f"state_digest {m['state_digest'][:16]})")
        if not result["finished"]:
            print(f"stopped at step {result['step']} (not finished); rerun the same command to resume")
    elif result["test_error"] is not None and result["finished"]:
        print(f"final test error: {result['test_error']:.2f}% (step {result['step']}, "
              f"state_digest {result['state_digest'][:16]})")
    else:
        print(f"stopped at step {result['step']} (not finished); rerun the same command to resume")
    return 0


def cmd_eval(argv: list[str]) -> int:
    ap = ArgumentParser(
        prog="resflax eval",
        description="Test error of the latest good checkpoint of a run, on every test image once. Read-only: "
                    "a damaged checkpoint is skipped (and said so), nothing in the workdir is changed, and it "
                    "can run while training holds the workdir.")
    ap.add_argument("--workdir", required=True,
                    help="run directory written by `resflax train` (a population's: each member, one line each)")
    ap.add_argument("--data_dir", default=None,
                    help="TFDS data_dir holding cifar10 (default: the run's, then $TFDS_DATA_DIR, "
                         "~/tensorflow_datasets)")
    ap.add_argument("--protocol", choices=("center", "10crop", "multiscale"), default="center",
                    help="ImageNet-style runs: centre 224 crop of the 256 resize (default), the standard 10-crop "
                         "(softmax averaged), or fully-convolutional multi-scale (shorter side 224..640, mirrors)")
    ap.add_argument("--record", action="store_true",
                    help="append the result to the run's metrics.jsonl as an {\"event\": \"eval\"} line (the only "
                         "write eval ever makes)")
    ap.add_argument("--json", action="store_true",
                    help="print one JSON object (workdir, model, step, protocol, test_error, test_top5_error, "
                         "test_examples, state_digest, skipped_damaged)")
    args = ap.parse_args(argv)
    from resflax.train.evaluate import evaluate_workdir  # noqa: PLC0415
    from resflax.train.workdir import population_members  # noqa: PLC0415

    members = population_members(args.workdir)
    results = [evaluate_workdir(w, args.data_dir, protocol=args.protocol, record=args.record)
               for w in (members if members is not None else [args.workdir])]
    if args.json:
        print(json.dumps(results if members is not None else results[0]))
        return 0
    for r in results:
        top5 = f", top-5 {r['test_top5_error']:.2f}%" if "test_top5_error" in r else ""
        how = f" ({r['protocol']})" if r["protocol"] != "center" else ""
        who = f"{Path(r['workdir']).name}: " if members is not None else ""
        print(f"{who}{r['model']} step {r['step']}: test error {r['test_error']:.2f}%{top5}{how} on "
              f"{r['test_examples']} images (state_digest {r['state_digest']})")
    return 0


def _model_config(argv: list[str]) -> list[str]:
    """``--model NAME`` without ``--config``: the experiment file of the model's family, with NAME."""
    if any(a.startswith("--config=") or a == "--config" for a in argv):
        return [a for a in argv if not a.startswith("--model")]
    model, out, it = None, [], iter(argv)
    for a in it:
        if a.startswith("--model="):
            model = a.split("=", 1)[1]
        elif a == "--model":
            model = next(it, None)
        else:
            out.append(a)
    if not model:
        raise BadInput("give --model NAME (or --config=experiments/FILE.py:NAME)")
    from resflax.models import model_spec  # noqa: PLC0415

    family = "cifar10" if model_spec(model)["stem"] == "cifar" else "imagenet"
    path = Path("experiments") / f"{family}.py"
    if not path.exists():
        raise BadInput(f"{path} not found: run from the resflax checkout, or give --config=PATH:{model}")
    return [f"--config={path}:{model}", *out]


def cmd_import(argv: list[str]) -> int:
    from absl import flags  # noqa: PLC0415

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
    fl, rest = _parse_config("resflax import", _model_config(argv), define)
    if len(rest) != 1 or not fl.workdir:
        raise BadInput("usage: resflax import SOURCE --model NAME --workdir DIR")
    from resflax.train.transfer import import_weights  # noqa: PLC0415

    r = import_weights(rest[0], fl.config, fl.workdir, fl.layout)
    print(f"imported {r['tensors']} tensors ({r['layout']} layout) as {r['model']} into {r['workdir']} "
          f"(state_digest {r['state_digest'][:16]})")
    return 0


def cmd_export(argv: list[str]) -> int:
    ap = ArgumentParser(prog="resflax export", description="a run's latest checkpoint as a PyTorch state dict "
                        "(.safetensors) that torchvision's models, or akamaster's CIFAR ResNets, load strictly")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--out", required=True, help="FILE.safetensors")
    ap.add_argument("--layout", choices=("torchvision", "cifar"), default=None,
                    help="default: cifar for CIFAR runs, torchvision for ImageNet ones")
    args = ap.parse_args(argv)
    from resflax.train.transfer import export_weights  # noqa: PLC0415

    r = export_weights(args.workdir, args.out, args.layout)
    print(f"wrote {r['tensors']} tensors of step {r['step']} ({r['layout']} layout) to {r['out']}")
    return 0


def cmd_predict(argv: list[str]) -> int:
    ap = ArgumentParser(prog="resflax predict", description="top-5 classes of image files by a run's latest checkpoint")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("images", nargs="+", help="image files (JPEG, PNG, ...)")
    ap.add_argument("--json", action="store_true", help="one JSON object per image")
    args = ap.parse_args(argv)
    from resflax.train.transfer import predict  # noqa: PLC0415

    for r in predict(args.workdir, args.images):
        if args.json:
            print(json.dumps(r))
            continue
        print(r["image"])
        for t in r["top"]:
            print(f"  {100 * t['probability']:6.2f}%  {t['name']} ({t['class']})")
    return 0


def cmd_prepare(argv: list[str]) -> int:
    ap = ArgumentParser(prog="resflax prepare-data",
                        description="prepare a dataset once as TFDS ArrayRecord (needs the prepare extra: TensorFlow)")
    ap.add_argument("--dataset", choices=("cifar10", "imagenet2012"), default="cifar10",
                    help="cifar10 is downloaded; imagenet2012 is built from the manual download's two tars")
    ap.add_argument("--data_dir", default=None, help="TFDS data_dir (default: $TFDS_DATA_DIR, ~/tensorflow_datasets)")
    ap.add_argument("--manual_dir", default=None,
                    help="imagenet2012: the folder holding ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar "
                         "(default: <data_dir>/downloads/manual)")
    args = ap.parse_args(argv)
    if args.dataset == "cifar10":
        if args.manual_dir:
            raise BadInput("--manual_dir applies to --dataset imagenet2012 only")
        from resflax.data.cifar10 import prepare  # noqa: PLC0415

        print(f"CIFAR-10 ready in {prepare(args.data_dir)}")
        return 0
    from resflax.data.imagenet_source import prepare as prepare_imagenet  # noqa: PLC0415

    print(f"imagenet2012 ready in {prepare_imagenet(args.data_dir, args.manual_dir)}")
    return 0


def cmd_make_tiny(argv: list[str]) -> int:
    ap = ArgumentParser(prog="resflax make-tiny-imagenet",
                        description="write a small ImageNet-like TFDS dataset of real photographs (for :tiny)")
    ap.add_argument("--out", required=True, help="TFDS data_dir to write it into (give it as --config.data_dir)")
    ap.add_argument("--name", default="resflax_tiny_jpeg", help="dataset name (give it as --config.dataset)")
    ap.add_argument("--num_classes", type=int, default=4, help="one sample photograph per class (at most 8)")
    ap.add_argument("--train_per_class", type=int, default=16)
    ap.add_argument("--val_per_class", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from resflax.data.tiny_imagenet import write_tiny_dataset  # noqa: PLC0415

    out = write_tiny_dataset(args.out, name=args.name, num_classes=args.num_classes,
                             train_per_class=args.train_per_class, val_per_class=args.val_per_class, seed=args.seed)
    print(f"{args.name} ready in {out}: {args.num_classes * args.train_per_class} train / "
          f"{args.num_classes * args.val_per_class} validation images")
    return 0


def cmd_report(argv: list[str]) -> int:
    from resflax.analysis.commands import cmd_report as run  # noqa: PLC0415

    return run(argv)


def cmd_responses(argv: list[str]) -> int:
    from resflax.analysis.commands import cmd_responses as run  # noqa: PLC0415

    return run(argv)


COMMANDS = {
    "summary": cmd_summary,
    "train": cmd_train,
    "eval": cmd_eval,
    "prepare-data": cmd_prepare,
    "make-tiny-imagenet": cmd_make_tiny,
    "import": cmd_import,
    "export": cmd_export,
    "predict": cmd_predict,
    "report": cmd_report,
    "responses": cmd_responses,
}


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


def _internal_error(cmd: str, argv: list[str], err: BaseException) -> int:
    """An exception nobody expected: a bug, or a failure inside JAX/XLA/Orbax. Never called bad input."""
    text = "".join(traceback.format_exception(err))
    sys.stderr.write(text)
    kept = ""
    workdir = _workdir_of(argv)
    if workdir is not None and workdir.is_dir():
        try:
            with open(workdir / "errors.log", "a") as f:
                f.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} resflax {cmd} {' '.join(argv)}\n{text}")
            kept = f"; traceback also in {workdir / 'errors.log'}"
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
    if cmd not in COMMANDS:
        return _fail(f"unknown command {cmd!r}; expected one of {', '.join(COMMANDS)}")
    try:
        return COMMANDS[cmd](rest)
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


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line and exit 2 through ``main`` (``BadInput``), not a usage dump."""

    def error(self, message: str):
        raise BadInput(f"{self.prog}: {message}")


if __name__ == "__main__":
    sys.exit(main())
