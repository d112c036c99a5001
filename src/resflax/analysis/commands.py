"""``resflax report`` and ``resflax responses``: parse flags, call ``analysis.report`` / ``analysis.responses``."""

from __future__ import annotations

import shlex

from resflax.cli import ArgumentParser
from resflax.errors import BadInput


def _command(name: str, argv: list[str]) -> str:
    return shlex.join(["resflax", name, *argv])


def cmd_report(argv: list[str]) -> int:
    from resflax.analysis import report  # noqa: PLC0415

    ap = ArgumentParser(
        prog="resflax report",
        description="Fig. 6 curves, the Table 6 markdown and report.md from run directories (finished or not)")
    ap.add_argument("runs", nargs="+", metavar="RUN_DIR",
                    help="run directories, or folders whose sub-directories are runs")
    ap.add_argument("--out", required=True, help="output folder (created): fig6*.png, table6.md, report.md")
    ap.add_argument("--dataset", default=None, help="name the data yourself (default: read from config.json)")
    ap.add_argument("--ymax", type=float, default=None, help="top of the error axis in %% (default: automatic)")
    ap.add_argument("--reference", nargs="+", default=[], metavar="RUN_DIR",
                    help="runs of another implementation (benchmarks/torch_train_check.py --workdir): their test "
                         "error of the same model and schedule becomes a column of Table 6")
    args = ap.parse_args(argv)
    runs = report.collect_runs(args.runs)
    refs = report.collect_runs(args.reference) if args.reference else []
    written = report.write_report(runs, args.out, _command("report", argv), args.dataset, args.ymax, refs)
    for r in runs:
        err = "none yet" if r.final_test is None else f"{r.final_test:.2f}%"
        print(f"{r.path}: {r.model} seed {r.seed}, {r.progress}, test error {err}")
    print("wrote " + ", ".join(str(p) for p in written.values()))
    return 0


def cmd_responses(argv: list[str]) -> int:
    from resflax.analysis import responses  # noqa: PLC0415

    ap = ArgumentParser(
        prog="resflax responses",
        description="Fig. 7: std of each 3x3 layer's response (after BN, before ReLU/addition) over the test set")
    ap.add_argument("--workdir", nargs="+", required=True, metavar="DIR",
                    help="run directories (latest checkpoint); a population's directory means its members")
    ap.add_argument("--out", default=None,
                    help="output folder (created): fig7.png, responses.csv, responses.md (default: DIR/responses "
                         "for one run directory, responses/ in the runs' common parent folder for several)")
    ap.add_argument("--data_dir", default=None, help="TFDS data_dir (default: the run's, then TFDS's lookup)")
    ap.add_argument("--max_images", type=int, default=None, help="first N test images (default: all 10,000)")
    ap.add_argument("--batch_size", type=int, default=500)
    args = ap.parse_args(argv)
    if args.max_images is not None and args.max_images <= 0:
        raise BadInput(f"--max_images must be positive, got {args.max_images}")
    if args.batch_size <= 0:
        raise BadInput(f"--batch_size must be positive, got {args.batch_size}")
    from resflax.train.workdir import population_members  # noqa: PLC0415

    cache: dict = {}
    results = []
    for w in [m for d in args.workdir for m in (population_members(d) or [d])]:  # a population: its members
        r = responses.run_responses(w, args.data_dir, args.max_images, args.batch_size, _cache=cache)
        stds = [s for _, s in r["layers"]]
        print(f"{w}: {r['model']} step {r['step']}, {len(stds)} 3x3 layers over {r['images']} test images, "
              f"std mean {sum(stds) / len(stds):.3f}, max {max(stds):.3f}", flush=True)
        results.append(r)
    out = args.out if args.out is not None else responses.default_out(args.workdir)
    written = responses.write_responses(results, out, _command("responses", argv))
    where = "" if args.out is not None else " (no --out given: the default next to the runs)"
    print("wrote " + ", ".join(str(p) for p in written.values()) + where)
    return 0
