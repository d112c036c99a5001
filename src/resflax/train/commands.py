"""The bodies of ``resflax train``, ``eval``, ``import``, ``export``, ``predict`` and ``bn-stats``: each
calls ``train.loop``, ``train.evaluate``, ``train.transfer`` or ``train.bnstats`` and prints the result.
``eval``, ``export``, ``predict`` and ``bn-stats`` parse their own flags; ``train`` and ``import`` read an
experiment config and ``--config.KEY`` overrides, which ``resflax.cli`` parses before it calls ``run_train`` /
``run_import`` here.

Start-up time: the modules that import JAX, Orbax and grain are imported after the flags are parsed, so that
``--help`` and a flag error answer at once (in about 0.1 s instead of 2-4 s).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from resflax import configs
from resflax.args import ArgumentParser
from resflax.errors import BadInput
from resflax.train.workdir import population_members


def run_train(config: Any, workdir: str | None, start_over: bool) -> int:
    """``resflax train`` with its flags parsed: trains (or resumes) and prints the final test error(s)."""
    if config is None and workdir and (Path(workdir) / "config.json").exists():
        from resflax.train.evaluate import load_config  # noqa: PLC0415 (start-up time: see the module's docstring)

        config = load_config(workdir)  # continue the run (e.g. imported weights) with its own settings
        print(f"settings from {Path(workdir) / 'config.json'}")
    if config is None or workdir is None:
        raise BadInput("--config and --workdir are required (--config may be left out to continue a run)")
    from resflax.train.loop import train_and_evaluate  # noqa: PLC0415 (start-up time)

    result = train_and_evaluate(config, workdir, start_over=start_over)
    if "members" in result:  # a population: one line per member
        for m in result["members"]:
            if m["status"] == "diverged":
                print(f"{m['name']}: diverged (stopped at step {m['step']}; see {m['dir']}/metrics.jsonl)")
            elif result["finished"] and m["test_error"] is not None:
                print(f"{m['name']}: final test error: {m['test_error']:.2f}% (step {m['step']}, "
                      f"state_digest {m['state_digest'][:16]})")
    elif result["test_error"] is not None and result["finished"]:
        print(f"final test error: {result['test_error']:.2f}% (step {result['step']}, "
              f"state_digest {result['state_digest'][:16]})")
    if not result["finished"] and not result.get("stopped_by_signal"):  # a signal's stop was said by the loop
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
                         "(softmax averaged), or multi-scale: the whole image at shorter sides 224..640 and "
                         "mirrored, softmax averaged (ResNets: fully convolutional, as the paper; VGG: its features "
                         "average-pooled to 7x7 before its FC layers, not VGG's dense evaluation)")
    ap.add_argument("--record", action="store_true",
                    help="append the result to the run's metrics.jsonl as an {\"event\": \"eval\"} line (the only "
                         "write eval ever makes)")
    ap.add_argument("--json", action="store_true",
                    help="print one JSON object (workdir, model, step, protocol, test_error, test_top5_error, "
                         "test_examples, state_digest, skipped_damaged)")
    args = ap.parse_args(argv)
    from resflax.train.evaluate import evaluate_workdir  # noqa: PLC0415 (start-up time)

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


def model_config(argv: list[str]) -> list[str]:
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
    from resflax.models import model_spec  # noqa: PLC0415 (start-up time)

    family = "cifar10" if model_spec(model)["stem"] == "cifar" else "imagenet"
    return [f"--config={configs.experiment_path(f'experiments/{family}.py')}:{model}", *out]


def run_import(source: str, fl: Any, given: frozenset[str] = frozenset()) -> int:
    """``resflax import`` with its flags ``fl`` parsed: the weights in ``source`` as checkpoint 0 of a new run, with
    timm's preprocessing when its config file or fields are given (``given``: the config keys the command line set,
    ``config_cli.given_keys``)."""
    from resflax.train.transfer import import_weights, read_timm_config  # noqa: PLC0415 (start-up time)

    timm = read_timm_config(fl.timm_config) if fl.timm_config else None
    fields = {k: v for k, v in (("interpolation", fl.interpolation), ("crop_pct", fl.crop_pct)) if v is not None}
    if fields:
        timm = {**(timm or {}), **fields}
    r = import_weights(source, fl.config, fl.workdir, fl.layout, timm=timm, given=given)
    print(f"imported {r['tensors']} tensors ({r['layout']} layout, {r['preprocessing']}'s preprocessing) as "
          f"{r['model']} into {r['workdir']} (state_digest {r['state_digest'][:16]})")
    return 0


def cmd_export(argv: list[str]) -> int:
    ap = ArgumentParser(prog="resflax export", description="a run's latest checkpoint as a PyTorch state dict "
                        "(.safetensors) that torchvision's models, or akamaster's CIFAR ResNets, load strictly")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--out", required=True, help="FILE.safetensors")
    ap.add_argument("--layout", choices=("torchvision", "cifar"), default=None,
                    help="default: cifar for CIFAR runs, torchvision for ImageNet ones")
    args = ap.parse_args(argv)
    from resflax.train.transfer import export_weights  # noqa: PLC0415 (start-up time)

    r = export_weights(args.workdir, args.out, args.layout)
    print(f"wrote {r['tensors']} tensors of step {r['step']} ({r['layout']} layout) to {r['out']}")
    return 0


def cmd_predict(argv: list[str]) -> int:
    ap = ArgumentParser(prog="resflax predict", description="top-5 classes of image files by a run's latest checkpoint")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("images", nargs="+", help="image files (JPEG, PNG, ...)")
    ap.add_argument("--json", action="store_true", help="one JSON object per image")
    args = ap.parse_args(argv)
    from resflax.train.transfer import NO_NAMES, predict  # noqa: PLC0415 (start-up time)

    for r in predict(args.workdir, args.images):
        if args.json:
            print(json.dumps(r))
            continue
        print(r["image"])
        for t in r["top"]:
            print(f"  {100 * t['probability']:6.2f}%  {t['name'] or NO_NAMES} ({t['class']})")
    return 0


def cmd_bn_stats(argv: list[str]) -> int:
    ap = ArgumentParser(
        prog="resflax bn-stats",
        description="A run's BatchNorm statistics recomputed the released Caffe models' way: the average over "
                    "BATCHES training batches (training augmentation, forward passes in train mode, no update) "
                    "replaces the moving averages. Writes a new run OUT; the source run is not changed.")
    ap.add_argument("--workdir", required=True, help="the run whose latest checkpoint is used")
    ap.add_argument("--out", required=True, help="new run directory to write (absent or empty)")
    ap.add_argument("--batches", type=int, default=100, help="training batches averaged (default 100)")
    ap.add_argument("--data_dir", default=None, help="TFDS data_dir (default: the run's)")
    args = ap.parse_args(argv)
    from resflax.train.bnstats import recompute  # noqa: PLC0415 (start-up time)

    r = recompute(args.workdir, args.out, args.batches, args.data_dir)
    print(f"BatchNorm statistics of {r['model']} step {r['step']} averaged over {r['batches']} training batches "
          f"({r['images']} images) into {r['workdir']} (state_digest {r['state_digest'][:16]})")
    return 0


COMMANDS = {"eval": cmd_eval, "export": cmd_export, "predict": cmd_predict, "bn-stats": cmd_bn_stats}
