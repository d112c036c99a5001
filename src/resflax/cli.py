"""``resflax`` command line: thin entry points that parse flags and call the library.

    resflax summary [MODEL ...] [--json]        parameters and multiply-adds beside the paper's
    resflax train --config=experiments/cifar10.py:resnet20 --workdir=DIR [--config.KEY=VALUE ...] [--start_over]
    resflax eval --workdir=DIR [--json]         test error of the latest checkpoint, with a state digest
    resflax prepare-data [--data_dir=DIR]       download and prepare CIFAR-10 (ArrayRecord) once
    resflax report RUN_DIR... --out DIR          Fig. 6 curves and the Table 6 markdown from runs
    resflax responses --workdir DIR [DIR...]     Fig. 7: std of each 3x3 layer's response (PNG + CSV)

Config files are Python, executed on load by design (like any ml-collections config): only run configs you
trust. Checkpoints are read with Orbax (no pickle).
"""

from __future__ import annotations

import argparse
import json
import sys

USAGE = __doc__


def _fmt_int(n) -> str:
    return f"{n:,}" if n is not None else "-"


def cmd_summary(argv: list[str]) -> int:
    from resflax.analysis.counts import summary  # noqa: PLC0415
    from resflax.models import available_models  # noqa: PLC0415

    ap = argparse.ArgumentParser(prog="resflax summary", description="parameters and multiply-adds per image")
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


def cmd_train(argv: list[str]) -> int:
    from absl import flags  # noqa: PLC0415
    from ml_collections import config_flags  # noqa: PLC0415

    fl = flags.FlagValues()
    full_argv = ["resflax train", *argv]
    # sys_argv: the --config.KEY overrides are read from this argv, not from sys.argv, so that
    # main(["train", ..., "--config.batch_size=16"]) works from Python.
    config_flags.DEFINE_config_file("config", None, "experiment config file[:arg]", lock_config=True, flag_values=fl,
                                    sys_argv=full_argv)
    flags.DEFINE_string("workdir", None, "run directory (checkpoints, logs)", flag_values=fl)
    flags.DEFINE_bool("start_over", False, "move an existing run in workdir aside and start fresh", flag_values=fl)
    try:
        fl(full_argv)
        config = fl.config
        if config is not None:
            config.to_dict()  # a config file that failed to load raises on first use
    except flags.Error as e:
        return _fail(str(e).splitlines()[0])
    except OSError as e:  # the config file is missing or unreadable: name it
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        return _fail(f"bad config: {next((ln for ln in lines if 'Errno' in ln), lines[0] if lines else e)}")
    except (ValueError, KeyError, AttributeError, TypeError) as e:
        return _fail(f"bad config: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    if config is None or fl.workdir is None:
        return _fail("--config and --workdir are required")
    from resflax.train.loop import train_and_evaluate  # noqa: PLC0415

    result = train_and_evaluate(config, fl.workdir, start_over=fl.start_over)
    if result["test_error"] is not None and result["finished"]:
        print(f"final test error: {result['test_error']:.2f}% (step {result['step']}, "
              f"state_digest {result['state_digest'][:16]})")
    else:
        print(f"stopped at step {result['step']} (not finished); rerun the same command to resume")
    return 0


def cmd_eval(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="resflax eval", description="evaluate the latest checkpoint of a run")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--data_dir", default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    from resflax.train.evaluate import evaluate_workdir  # noqa: PLC0415

    r = evaluate_workdir(args.workdir, args.data_dir)
    if args.json:
        print(json.dumps(r))
    else:
        print(f"{r['model']} step {r['step']}: test error {r['test_error']:.2f}% on {r['test_examples']} images "
              f"(state_digest {r['state_digest']})")
    return 0


def cmd_prepare(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="resflax prepare-data", description="download and prepare CIFAR-10 once")
    ap.add_argument("--data_dir", default=None)
    args = ap.parse_args(argv)
    from resflax.data.cifar10 import prepare  # noqa: PLC0415

    print(f"CIFAR-10 ready in {prepare(args.data_dir)}")
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
    "report": cmd_report,
    "responses": cmd_responses,
}


def _fail(msg: str) -> int:
    print(f"resflax: error: {msg}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        return _fail(f"unknown command {cmd!r}; expected one of {', '.join(COMMANDS)}")
    from resflax.data.cifar10 import DataError  # noqa: PLC0415
    from resflax.train.checkpoint import CheckpointError  # noqa: PLC0415
    from resflax.train.loop import DivergenceError  # noqa: PLC0415
    from resflax.train.workdir import WorkdirError  # noqa: PLC0415

    try:
        return COMMANDS[cmd](rest)
    except (ValueError, DataError, WorkdirError, FileNotFoundError, CheckpointError) as e:
        return _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    except DivergenceError as e:
        _fail(str(e))
        return 3
    except KeyboardInterrupt:
        _fail("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
