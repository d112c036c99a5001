"""Writes the generated sections of docs/performance.md from fresh runs of benchmarks/step_time.py (each in its
own process).

    .venv/bin/python benchmarks/report.py                 # full table (about 15-25 minutes on 2 cores)
    .venv/bin/python benchmarks/report.py --quick         # ResNet-20 only
    .venv/bin/python benchmarks/report.py --out /tmp/p.md
    python benchmarks/report.py --versions PY_A PY_B --torch-python PY_T   # train step per JAX version

Only the text between a section's two markers (``<!-- report.py ...: begin -->`` / ``... end -->``) is
replaced; everything else in the file (the hand-written sections) stays as it is. A file without the markers
is not touched (an error); a file that does not exist gets just the section.

``--versions`` runs ResNet-20/56/110 at batch 128 with each given Python (each a JAX environment; resflax from
this checkout's ``src``): in each run resflax as it runs by default, the same step with the YNN fusion flag
set by hand in a child process (``step_time.py --vs-xla-flags``) and the PyTorch reference in a child process
of ``--torch-python`` (``step_time.py --torch-python``), interleaved round by round. Runs go model by model,
the Pythons alternating, so that each model's rows see similar load.

Every throughput figure is measured side by side with the PyTorch reference in the same process (rounds
interleaved), so the ratio stays meaningful on a shared machine; the 1-minute load average at the end of each
run is recorded (above the core count, other processes competed for the cores and absolute numbers are low).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
MARK = "<!-- report.py {}: {} -->"
MAIN, VERSIONS = "throughput", "versions"

THROUGHPUT = [
    ["--model", "resnet20", "--batch", "128", "--torch", "--steps", "12", "--rounds", "6"],
    ["--model", "resnet56", "--batch", "128", "--torch", "--steps", "8", "--rounds", "4"],
    ["--model", "resnet110", "--batch", "128", "--torch", "--steps", "6", "--rounds", "3"],
    ["--model", "resnet20", "--batch", "128", "--torch", "--steps", "12", "--rounds", "6", "--impl", "flax",
     "--no-barriers"],
    ["--model", "resnet20", "--batch", "128", "--torch", "--steps", "12", "--rounds", "6", "--devices", "2"],
]
COMPILE = [
    ["--model", "resnet110", "--batch", "128", "--mode", "train", "--steps", "2", "--warmup", "1"],
    ["--model", "resnet110", "--batch", "128", "--mode", "eval", "--steps", "3", "--warmup", "1"],
    # ResNet-1202 at the batch 8 (batch 128 on one device needs ~23 GB); its stages run as a lax.scan by
    # default; the unrolled row is the reference it replaces (compile minutes, same step time)
    ["--model", "resnet1202", "--batch", "8", "--mode", "train", "--steps", "3", "--warmup", "1"],
    ["--model", "resnet1202", "--batch", "8", "--mode", "train", "--steps", "3", "--warmup", "1",
     "--scan-min-blocks", "none"],
    ["--model", "resnet1202", "--batch", "128", "--mode", "eval", "--steps", "2", "--warmup", "1"],
]
NO_FLAG_ENV = {"RESFLAX_XLA_DEFAULTS": "0"}
# --versions: (model, step_time.py options) and the settings each is run with
VERSION_RUNS = [
    ("resnet20", ["--steps", "4", "--rounds", "2", "--warmup", "1"]),
    ("resnet56", ["--steps", "2", "--rounds", "2", "--warmup", "1"]),
    ("resnet110", ["--steps", "2", "--rounds", "2", "--warmup", "1"]),
]
YNN_FORCED = "--xla_cpu_experimental_ynn_fusion_type=eltwise,reduce"


def replace_section(text: str, name: str, body: str) -> str:
    """``text`` with what lies between section ``name``'s markers replaced by ``body``; ValueError if the
    markers are not there once each, in order."""
    begin, end = MARK.format(name, "begin"), MARK.format(name, "end")
    i, j = text.find(begin), text.find(end)
    if text.count(begin) != 1 or text.count(end) != 1 or j < i:
        raise ValueError(f"the markers {begin} and {end} are not there once each, in that order")
    return text[: i + len(begin)] + "\n" + body.strip("\n") + "\n" + text[j:]


def write_section(path: str | Path, name: str, body: str) -> None:
    """Writes ``body`` between section ``name``'s markers in ``path``, leaving the rest of the file as it is;
    a missing file gets the section alone. Refuses (SystemExit) a file without the markers."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{MARK.format(name, 'begin')}\n{body.strip()}\n{MARK.format(name, 'end')}\n")
        return
    try:
        text = replace_section(path.read_text(), name, body)
    except ValueError as e:
        raise SystemExit(f"{path}: {e}; add them around the section to be generated (nothing written)") from None
    path.write_text(text)


def run_one(args: list[str], env_extra: dict | None = None, python: str | None = None,
            python_shown: str = "python") -> dict:
    cmd = [python or sys.executable, str(HERE / "step_time.py"), *args, "--json"]
    env = dict(os.environ, **(env_extra or {}))
    if python:  # resflax from this checkout, whichever environment runs it
        env["PYTHONPATH"] = os.pathsep.join(x for x in (str(ROOT / "src"), env.get("PYTHONPATH")) if x)
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    shown = " ".join(f"{k}={v}" for k, v in (env_extra or {}).items())
    shown = (shown + " " if shown else "") + f"{python_shown} benchmarks/step_time.py " + " ".join(
        map(shlex.quote, args))
    if res.returncode != 0:
        return {"error": res.stderr[-800:], "command": shown}
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["command"] = shown + " --json"
    return out


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        flags = open("/proc/cpuinfo").read()
        avx512 = " AVX-512" if "avx512f" in flags else ""
    except OSError:
        avx512 = ""
    return f"{model}, {os.cpu_count()} cores{avx512}, {platform.system()} {platform.release()}"


def versions() -> str:
    import flax  # noqa: PLC0415
    import jax  # noqa: PLC0415
    import jaxlib  # noqa: PLC0415

    s = f"jax {jax.__version__}, jaxlib {jaxlib.__version__}, flax {flax.__version__}"
    try:
        import torch  # noqa: PLC0415

        s += f", torch {torch.__version__}"
    except ImportError:
        s += ", torch not installed"
    return s + f", Python {platform.python_version()}"


def model_stage_sizes(name: str) -> tuple:
    from resflax.models import model_spec  # noqa: PLC0415

    return tuple(model_spec(name)["stage_sizes"])


def fmt(v, nd=1):
    return "-" if v is None else f"{v:.{nd}f}"


def versions_section(pythons: list[str], torch_python: str) -> str:
    """The section ``--versions`` writes: one step_time.py run per model and Python, three steps interleaved
    in it (resflax as it runs by default, the same step with the YNN flag forced in a child process, PyTorch
    in a child of ``torch_python``)."""
    names = [f"PY_{chr(ord('A') + i)}" for i in range(len(pythons))]
    rows = []
    for model, opts in VERSION_RUNS:
        for py, name in zip(pythons, names):
            args = ["--model", model, "--batch", "128", *opts, "--torch-python", torch_python,
                    f"--vs-xla-flags={YNN_FORCED}"]
            r = run_one(args, python=py, python_shown=name)
            r["command"] = r["command"].replace(shlex.quote(torch_python), "PY_T")
            r["python_name"] = name
            rows.append(r)
            print(json.dumps(r), flush=True)
    ok = [r for r in rows if "error" not in r]
    envs = {}
    for r in ok:
        envs.setdefault(r["python_name"], f"Python {r['python']}, jax {r['jax']}, jaxlib {r['jaxlib']}")
    torch_env = next((f"Python {r['torch_python']}, torch {r['torch_version']}" for r in ok), "?")
    lines = [
        "## Training throughput by JAX version (batch 128)",
        "",
        f"Generated by `python benchmarks/report.py --versions {' '.join(names)} --torch-python PY_T` on "
        f"{datetime.date.today().isoformat()}, with "
        + "; ".join(f"`{k}`: {v}" for k, v in envs.items())
        + f"; `PY_T`: {torch_env} (the PyTorch reference).",
        "",
        f"- Machine: {machine()}.",
        "- One `step_time.py` process per row, three train steps timed in it round by round: resflax as it runs "
        "by default with that jaxlib on this CPU (`default flags`: what `resflax.xla.default_flags()` added, "
        "`(none)` if nothing), the same step in a child process with "
        f"`XLA_FLAGS={YNN_FORCED}` (`--vs-xla-flags`), and PyTorch in a child process of `PY_T` "
        "(`--torch-python`). ratio = img/s / PyTorch's img/s of the same run; `flag speed-up` = default step "
        "time / flag step time.",
        "- `load`: the 1-minute load average at the end of the run. Above the 2 cores, other processes competed "
        "for them; PyTorch (OpenMP) then slows down far more than XLA, so its ratios flatter resflax, while the "
        "flag speed-up (two XLA steps under the same load) stays comparable.",
        "",
        "| model | jaxlib | Python | default flags | resflax img/s | ratio | flag forced img/s | ratio "
        "| flag speed-up | PyTorch img/s | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| error | | | | | | | | | | `{r['command']}`: {r['error'][-200:]!r} |")
            continue
        flags = r.get("xla_flags", "").replace("--xla_cpu_experimental_ynn_fusion_type=", "ynn=") or "(none)"
        lines.append(
            f"| {r['model']} | {r['jaxlib']} | {r['python']} | {flags} | {fmt(r['images_per_s'])} "
            f"| {fmt(r.get('ratio'), 2)} | {fmt(r.get('vs_images_per_s'))} | {fmt(r.get('vs_ratio'), 2)} "
            f"| {fmt(r.get('vs_speedup'), 2)}× | {fmt(r.get('torch_images_per_s'))} | {r.get('loadavg_1m')} |"
        )
    lines += ["", "Commands and raw results:", "", "```"] + [json.dumps(r) for r in rows] + ["```"]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "docs" / "performance.md"))
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-1202", action="store_true", help="skip ResNet-1202 (its compile and steps take minutes)")
    p.add_argument("--versions", nargs="+", metavar="PY",
                   help="only the by-version section: these Pythons (JAX environments), see the module docstring")
    p.add_argument("--torch-python", help="with --versions: the Python that runs the PyTorch reference")
    a = p.parse_args(argv)
    if a.versions:
        if not a.torch_python:
            p.error("--versions needs --torch-python")
        write_section(a.out, VERSIONS, versions_section(a.versions, a.torch_python))
        print(f"wrote section {VERSIONS!r} of {a.out}")
        return 0
    thr = THROUGHPUT[:1] if a.quick else THROUGHPUT
    comp = [] if a.quick else [c for c in COMPILE if not (a.no_1202 and "resnet1202" in c)]
    rows = []
    for args in thr:
        rows.append(run_one(args))
        print(json.dumps(rows[-1]), flush=True)
    if not a.quick:
        # the same default step without resflax's default XLA flag (what an untested jaxlib gets)
        rows.append(run_one(THROUGHPUT[0], NO_FLAG_ENV))
        print(json.dumps(rows[-1]), flush=True)
    crows = []
    for args in comp:
        crows.append(run_one(args))
        print(json.dumps(crows[-1]), flush=True)

    lines = [
        f"Generated by `python benchmarks/report.py{' --quick' if a.quick else ''}"
        f"{' --no-1202' if a.no_1202 else ''}` on "
        f"{datetime.date.today().isoformat()}.",
        "",
        f"- Machine: {machine()}",
        f"- Versions: {versions()}",
        "- Step: the real `make_train_step` / `make_eval_step` (shard_map over the `data` mesh, on-device batch "
        "draw and augmentation, SGD+momentum+weight decay, BN in train mode), synthetic data, float32, "
        "warm-up excluded, median over the timed steps.",
        "- PyTorch: `benchmarks/torch_reference.py` (same networks, channels_last, eager), timed in the same "
        "process, interleaved round by round; ratio = resflax img/s / PyTorch img/s.",
        "- `load` is the 1-minute load average at the end of the run: above the core count, other processes "
        "competed for the CPU (PyTorch suffers more from that than XLA, so such ratios flatter resflax).",
        "",
        "## Training throughput (batch 128)",
        "",
        "| model | devices | impl | XLA flags | resflax img/s | PyTorch img/s | ratio | compile s | load | command |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| error | | | | | | | | | `{r['command']}`: {r['error'][-200:]!r} |")
            continue
        flags = r.get("xla_flags", "").replace("--xla_cpu_experimental_ynn_fusion_type=", "ynn=")
        flags = flags.replace("--xla_force_host_platform_device_count=", "host_devices=") or "(none)"
        lines.append(
            f"| {r['model']} | {r['devices']} | {r['impl']}{'' if r['barriers'] else ', no barriers'} | {flags} | "
            f"{fmt(r['images_per_s'])} | {fmt(r.get('torch_images_per_s'))} | {fmt(r.get('ratio'), 2)} | "
            f"{fmt(r['compile_s'])} | {r.get('loadavg_1m')} | `{r['command']}` |"
        )
    if crows:
        lines += [
            "",
            "## Compile time",
            "",
            "`stages`: unrolled, or the stages of at least `scan_min_blocks` blocks run as one `lax.scan` "
            "(the default for ResNet-1202 only).",
            "",
            "| model | batch | mode | stages | compile s | bound s | step s | img/s | load | command |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in crows:
            if "error" in r:
                lines.append(f"| error | | | | | | | | | `{r['command']}`: {r['error'][-200:]!r} |")
                continue
            bound = 15 if r["model"] == "resnet110" else 60
            smb = r.get("scan_min_blocks")
            scanned = smb is not None and max(model_stage_sizes(r["model"])) >= smb
            lines.append(
                f"| {r['model']} | {r['batch']} | {r['mode']} | {'scanned' if scanned else 'unrolled'} | "
                f"{fmt(r['compile_s'])} | {bound} | {fmt(r['step_s'], 3)} | "
                f"{fmt(r['images_per_s'])} | {r.get('loadavg_1m')} | `{r['command']}` |"
            )
    lines += ["", "## Raw results", "", "```"] + [json.dumps(r) for r in rows + crows] + ["```"]
    write_section(a.out, MAIN, "\n".join(lines))
    print(f"wrote section {MAIN!r} of {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
