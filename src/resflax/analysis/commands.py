"""The bodies of ``resflax summary``, ``resflax report`` and ``resflax responses``: each parses its flags, calls
``analysis.counts`` / ``analysis.report`` / ``analysis.responses`` and prints what it found and wrote."""

from __future__ import annotations

import json
import shlex

from resflax.analysis import report, responses
from resflax.analysis.counts import summary
from resflax.args import ArgumentParser
from resflax.errors import BadInput
from resflax.models import available_models
from resflax.train.workdir import population_members


def _command(name: str, argv: list[str]) -> str:
    return shlex.join(["resflax", name, *argv])


def _fmt_int(n) -> str:
    return f"{n:,}" if n is not None else "-"


def cmd_summary(argv: list[str]) -> int:
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


def cmd_report(argv: list[str]) -> int:
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


COMMANDS = {"summary": cmd_summary, "report": cmd_report, "responses": cmd_responses}
