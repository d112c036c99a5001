"""The paper's Fig. 6 (CIFAR-10 error curves) and Table 6 (test errors), generated from run directories.

A run directory is what ``resflax train`` writes: ``config.json`` and ``metrics.jsonl``. Runs still in
progress are reported with what exists and marked; a step logged twice (a resumed run) counts once, the
last record winning. Nothing here is hand-edited: ``resflax report RUN_DIR... --out DIR`` regenerates it.
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

import matplotlib
from matplotlib.lines import Line2D

from resflax import __version__
from resflax.analysis import counts
from resflax.analysis.runs import (  # noqa: F401  (re-exported: report.Run, report.colour, ...)
    FINAL_TRAIN_FRACTION,
    Run,
    collect_runs,
    colour,
    data_dir_used,
    dataset_name,
    family_depth,
    label,
    load_run,
    portable_path,
    read_metrics,
    schedules_note,
)
from resflax.models import get_model

PAPER_110_MEAN = (6.61, 0.16)  # Table 6: ResNet-110 mean ± std of 5 runs; counts.PAPER holds the best (6.43)


# --------------------------------------------------------------------------------------------- Table 6


def _fmt(x: float | None, sign: bool = False) -> str:
    return "–" if x is None else (f"{x:+.2f}" if sign else f"{x:.2f}")


def _errors(rs: list[Run]) -> tuple[str, list[Run]]:
    """Final test errors of a group of runs of one setting (mean ± std, best, over seeds; † not final)."""
    done = [r for r in rs if r.finished]
    # Final errors come from finished runs; only when none has finished do we show the latest (marked).
    pool, mark = (done, "") if done else ([r for r in rs if r.final_test is not None], " †")
    vals = [r.final_test for r in pool]
    if not vals:
        return "–", pool
    if len(vals) == 1:
        return _fmt(vals[0]) + mark, pool
    mean, std, best = statistics.mean(vals), statistics.stdev(vals), min(vals)
    return f"{mean:.2f} ± {std:.2f} (best {best:.2f}, n={len(vals)}){mark}", pool


def table6_rows(runs: list[Run], references: list[Run] = ()) -> list[dict[str, str]]:
    """One row per (model, schedule): depth, exact params, paper's error, ours, difference, completion; with
    ``references`` (runs of another implementation, e.g. the PyTorch reference) their error of the same model
    and schedule in a column of its own."""
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        groups.setdefault((r.model, r.num_steps, r.schedule, r.config.get("shortcut")), []).append(r)
    fam_order = {"resnet": 0, "plain": 1, "other": 2}
    rows = []
    for (model, _, schedule, shortcut), rs in sorted(
            groups.items(), key=lambda kv: (fam_order[family_depth(kv[0][0])[0]], family_depth(kv[0][0])[1],
                                            kv[0][0], kv[0][1])):
        rs = sorted(rs, key=lambda r: r.seed)
        fam, depth = family_depth(model)
        params = counts.count(get_model(model, **({"shortcut": shortcut} if shortcut else {})),
                              counts.input_shape(model))["params"]
        paper = counts.PAPER.get(model, {}).get("error")
        done = [r for r in rs if r.finished]
        ours, pool = _errors(rs)
        vals = [r.final_test for r in pool]
        if not vals:
            diff = "–"
        elif len(vals) == 1:
            diff = _diff(model, vals[0], None, paper)
        else:
            diff = _diff(model, statistics.mean(vals), min(vals), paper)
        if len(rs) == len(done):
            fin = "yes" if len(rs) == 1 else f"all {len(rs)}"
        else:
            left = "; ".join(f"seed {r.seed}: {r.progress.removeprefix('in progress: ')}" for r in rs
                             if not r.finished)
            fin = f"no ({left})" if len(rs) == 1 else f"{len(done)} of {len(rs)} ({left})"
        paper_s = _fmt(paper) if paper is not None else ("– (curves only)" if fam == "plain" else "–")
        if model == "resnet110":
            paper_s = f"{paper:.2f} best of 5; {PAPER_110_MEAN[0]:.2f} ± {PAPER_110_MEAN[1]:.2f} mean"
        row = {"model": label(model), "depth": str(depth or "–"), "params": f"{params:,}",
               "paper error %": paper_s, "ours: test error %": ours}
        if references:
            same = [r for r in references if r.model == model and r.num_steps == rs[0].num_steps]
            row["reference: test error %"] = _errors(same)[0] if same else "–"
        rows.append({**row, "ours − paper": diff, "seeds": ",".join(str(r.seed) for r in rs), "schedule": schedule,
                     "finished": fin})
    return rows


def _diff(model: str, value: float, best: float | None, paper: float | None) -> str:
    if paper is None:
        return "–"
    if model == "resnet110":  # compare like with like: mean with the paper's mean, best with its best
        out = f"{value - PAPER_110_MEAN[0]:+.2f} vs paper mean"
        return out + (f"; best {best - paper:+.2f} vs paper best" if best is not None else "")
    return _fmt(value - paper, sign=True)


def markdown_table(rows: list[dict[str, str]]) -> str:
    if not rows:
        return "_no runs_\n"
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "|".join("---" for _ in keys) + "|"]
    lines += ["| " + " | ".join(r[k] for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def table6_markdown(runs: list[Run], dataset: str, references: list[Run] = ()) -> str:
    rows = table6_rows(runs, references)
    notes = [
        f"Data: {dataset}. Test error % of the last evaluation (every test image once); with several seeds "
        "mean ± sample std (n−1) and the best over seeds. Params: exact count of this project's model "
        "(resflax.analysis.counts). Paper: He et al. (2015), Table 6 (164 epochs, 64k iterations).",
        "† not final: no run of this row has finished its schedule; the latest test error is shown.",
    ]
    if not any("†" in r["ours: test error %"] + r.get("reference: test error %", "") for r in rows):
        notes.pop(1)
    if references:
        kinds = sorted({f"{r.config.get('framework', 'other')} on {r.config.get('device', '?')}" for r in references})
        notes.append(f"Reference: the same recipe and data trained by another implementation ({', '.join(kinds)}; "
                     "benchmarks/torch_train_check.py), same model and schedule, final test error.")
    if mixed := schedules_note(runs):
        notes.append(mixed + ".")
    return "# Table 6 (CIFAR-10 test error)\n\n" + markdown_table(rows) + "\n" + "\n\n".join(notes) + "\n"


# --------------------------------------------------------------------------------------------- Fig. 6


def fig6_panels(runs: list[Run]) -> list[tuple[str, str, list[Run]]]:
    """The paper's panels that these runs fill: ``(file stem, title, runs)``."""
    by = lambda fam, keep: [r for r in runs if family_depth(r.model)[0] == fam and keep(family_depth(r.model)[1])]
    panels = [("plain", "plain networks", by("plain", lambda d: True)),
              ("resnet", "ResNets", by("resnet", lambda d: d != 1202))]
    if any(family_depth(r.model) == ("resnet", 1202) for r in runs):
        panels.append(("resnet110_1202", "ResNet-110 vs ResNet-1202", by("resnet", lambda d: d in (110, 1202))))
    return [p for p in panels if p[2]]


def _draw_panel(ax, title: str, runs: list[Run], ymax: float) -> None:
    runs = sorted(runs, key=lambda r: (family_depth(r.model)[1], r.num_steps, r.seed))
    mixed = len({r.num_steps for r in runs}) > 1
    seen: set[tuple[str, int]] = set()
    handles = []
    for r in runs:
        key = (r.model, r.num_steps)
        first = key not in seen
        seen.add(key)
        c, alpha = colour(family_depth(r.model)[1]), 1.0 if first else 0.35
        if r.train:
            ax.plot(*zip(*r.train), color=c, lw=0.8, ls="--", alpha=alpha)
        if r.test:
            ax.plot(*zip(*r.test), color=c, lw=2.0, alpha=alpha)
            if not r.finished:  # where an unfinished run stands now
                ax.plot(*r.test[-1], marker="o", mfc="none", color=c, alpha=alpha)
        if first:
            name = label(r.model) + (f" ({r.num_steps:,} it)" if mixed else "")
            n_seeds = sum(1 for q in runs if (q.model, q.num_steps) == key)
            name += f", {n_seeds} seeds" if n_seeds > 1 else ""
            busy = sum(1 for q in runs if (q.model, q.num_steps) == key and not q.finished)
            name += "" if not busy else " — in progress ○" if n_seeds == 1 else f" — {busy} in progress ○"
            handles.append(Line2D([], [], color=c, lw=2.0, label=name))
    if not mixed:
        for b in runs[0].boundaries:
            ax.axvline(b, color="0.7", lw=0.6, ls=":")
    handles += [Line2D([], [], color="k", lw=0.8, ls="--", label="training error"),
                Line2D([], [], color="k", lw=2.0, label="test error")]
    ax.legend(handles=handles, fontsize=7, loc="upper right")
    ax.set(title=title, xlabel="iterations", ylabel="error (%)", ylim=(0, ymax))
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)


def auto_ymax(runs: list[Run]) -> float:
    """Like the paper's 0–20% where the runs allow; higher (to the next 10) for short or unfinished runs."""
    finals = [e for r in runs for e in (r.final_test, r.final_train) if e is not None]
    return float(min(100, max(20, 10 * math.ceil(1.5 * max(finals, default=0) / 10))))


def plot_fig6(runs: list[Run], out: Path, ymax: float | None = None) -> list[Path]:
    """Writes ``fig6.png`` (all panels side by side) and ``fig6_<panel>.png``; returns the paths written."""
    matplotlib.use("Agg")  # files, no window: chosen when a figure is written, not when this module is imported
    import matplotlib.pyplot as plt  # noqa: PLC0415 (after the backend is chosen: it fixes the backend)

    panels = fig6_panels(runs)
    if not panels:
        return []
    ymax = ymax or auto_ymax(runs)
    written = []
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.0), squeeze=False)
    for ax, (_, title, rs) in zip(axes[0], panels):
        _draw_panel(ax, title, rs, ymax)
    fig.tight_layout()
    fig.savefig(out / "fig6.png", dpi=120)
    plt.close(fig)
    written.append(out / "fig6.png")
    for stem, title, rs in panels:
        fig, ax = plt.subplots(figsize=(5.2, 4.0))
        _draw_panel(ax, title, rs, ymax)
        fig.tight_layout()
        fig.savefig(out / f"fig6_{stem}.png", dpi=120)
        plt.close(fig)
        written.append(out / f"fig6_{stem}.png")
    return written


# --------------------------------------------------------------------------------------------- report.md


def findings(runs: list[Run]) -> list[str]:
    """The paper's qualitative claims, checked on finished runs of one schedule: plain nets train worse when
    deeper (degradation), ResNets better."""
    out = []
    for fam, want in (("plain", "higher"), ("resnet", "lower")):
        for steps in sorted({r.num_steps for r in runs}):
            rs = [r for r in runs if family_depth(r.model)[0] == fam and r.finished and r.num_steps == steps]
            by_depth: dict[int, list[float]] = {}
            for r in rs:
                by_depth.setdefault(family_depth(r.model)[1], []).append(r.final_train)
            if len(by_depth) < 2:
                continue
            depths = sorted(by_depth)
            vals = [statistics.mean(by_depth[d]) for d in depths]
            shown = ", ".join(f"{label(f'{fam}{d}')} {v:.2f}%" for d, v in zip(depths, vals))
            got = all(b > a for a, b in zip(vals, vals[1:])) if want == "higher" else \
                all(b < a for a, b in zip(vals, vals[1:]))
            out.append(f"- {'Plain nets' if fam == 'plain' else 'ResNets'}, {steps:,} iterations, final training "
                       f"error by depth: {shown} — deeper is {want} throughout (the paper's finding): "
                       f"**{'yes' if got else 'no'}**.")
    return out


def runs_table(runs: list[Run]) -> str:
    rows = [{"run": portable_path(r.path), "model": label(r.model), "seed": str(r.seed),
             "batch": str(r.config.get("batch_size", "–")), "schedule": r.schedule, "status": r.progress,
             "final train error %": _fmt(r.final_train), "final test error %": _fmt(r.final_test)}
            for r in sorted(runs, key=lambda r: (r.model, r.seed, str(r.path)))]
    return markdown_table(rows)


def write_report(runs: list[Run], out: str | Path, command: str, dataset: str | None = None,
                 ymax: float | None = None, references: list[Run] = ()) -> dict[str, Path]:
    """Writes ``fig6*.png``, ``table6.md`` and ``report.md`` into ``out``; returns the paths by name."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dataset = dataset or "; ".join(sorted({dataset_name(r.config) for r in runs}))
    figs = plot_fig6(runs, out, ymax)
    table = table6_markdown(runs, dataset, references)
    (out / "table6.md").write_text(table)
    unfinished = [r for r in runs if not r.finished]
    parts = [
        "# CIFAR-10: degradation curves (Fig. 6) and test errors (Table 6)\n",
        f"Generated by `{command}` on {time.strftime('%Y-%m-%d %H:%M %Z')} (resflax {__version__}); "
        "do not edit by hand: rerun the command.\n",
        f"- Data: {dataset}.",
        f"- Runs: {len(runs)} ({len(runs) - len(unfinished)} finished, {len(unfinished)} in progress or "
        "without metrics; unfinished runs are drawn up to where they are, ending in ○, and marked in the tables).",
        "- Schedule: " + (schedules_note(runs) or f"{runs[0].schedule} for every run"
                          + ("" if runs[0].schedule.startswith("paper") else
                             ": a scaled schedule (every step count of the paper's scaled alike), not the "
                             "paper's 64k iterations")) + ".",
    ]
    if any(r.bad_lines for r in runs):
        parts.append(f"- Skipped {sum(r.bad_lines for r in runs)} unreadable metrics line(s) "
                     "(a line being written while this report read it).")
    if figs:
        parts.append("\n## Fig. 6: training error (dashed) and test error (bold) against iterations\n")
        parts += [f"![{p.stem}]({p.name})" for p in figs[:1]]
        parts.append("\nPanels on their own: " + ", ".join(f"[{p.name}]({p.name})" for p in figs[1:]) + ".")
    parts.append("\n" + table.replace("# Table 6", "## Table 6", 1))
    if found := findings(runs):
        parts += ["## The paper's findings on these runs\n",
                  f"Final training error: the mean of the training-error records over the last "
                  f"{FINAL_TRAIN_FRACTION:.0%} of the iterations.\n", *found]
    parts += ["\n## Runs\n", runs_table(runs)]
    (out / "report.md").write_text("\n".join(parts) + "\n")
    return {"report": out / "report.md", "table6": out / "table6.md", **{p.stem: p for p in figs}}
