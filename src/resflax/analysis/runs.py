"""Run directories as data: a run's config and its error curves, and what it trained on.

A run directory is what ``resflax train`` writes: ``config.json`` and ``metrics.jsonl``. A step logged twice
(a resumed run) counts once, the last record winning; a line being written while it is read is skipped and
counted. ``analysis.report`` draws and tabulates these.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from resflax.errors import BadInput
from resflax.train.schedules import scaled_steps
from resflax.train.workdir import population_members

PAPER_NUM_STEPS, PAPER_BOUNDARIES = 64_000, (32_000, 48_000)
SHARED_COPY = Path("shared") / "tfds"  # this project's JPEG (quality 75) copy of CIFAR-10
# One colour per depth in every figure (Fig. 6 and Fig. 7), so a depth reads the same everywhere.
DEPTH_COLOURS = {8: "tab:gray", 20: "tab:orange", 32: "tab:green", 44: "tab:red", 56: "tab:blue",
                 110: "tab:purple", 1202: "tab:brown"}
_SPARE_COLOURS = ("tab:pink", "tab:olive", "tab:cyan", "black")
FINAL_TRAIN_FRACTION = 0.05  # "final training error": mean of the records in the last 5% of the iterations


def portable_path(p: str | os.PathLike) -> str:
    """``p`` as written into generated files (markdown, CSV, figures): no machine-specific absolute paths.

    Under the current directory or at most two ``..`` above it: relative to it (``../shared/tfds`` from a
    checkout beside ``shared/``); else under the home directory: ``~/...``; else ``…/`` and its last two components.
    Only for what people read: the values the code works with keep their absolute paths.
    """
    s = os.fspath(p)
    if not s:
        return s
    path = os.path.abspath(os.path.expanduser(s))
    try:
        rel = os.path.relpath(path, os.getcwd())
    except ValueError:  # another drive (Windows)
        rel = None
    if rel is not None and Path(rel).parts[:3].count(os.pardir) <= 2:
        return Path(rel).as_posix()
    home = os.path.expanduser("~").rstrip(os.sep)
    if home not in ("~", "") and (path == home or path.startswith(home + os.sep)):
        return "~" + path[len(home):].replace(os.sep, "/")
    parts = [q for q in Path(path).parts if q != Path(path).anchor]
    return "…/" + "/".join(parts[-2:])


def family_depth(model: str) -> tuple[str, int]:
    """``("resnet", 56)`` for ``resnet56`` (or ``cifar_resnet56``); ``("other", 0)`` for names outside the CIFAR
    families (``imagenet_``-prefixed names, ``vgg16``)."""
    from resflax.models.registry import parse_model_name  # noqa: PLC0415 (flax: only when a name is read)

    n = parse_model_name(model)
    return (n.kind, n.depth) if n is not None and n.prefix != "imagenet" else ("other", 0)


def label(model: str) -> str:
    fam, depth = family_depth(model)
    return {"resnet": f"ResNet-{depth}", "plain": f"plain-{depth}"}.get(fam, model)


def colour(depth: int) -> str:
    return DEPTH_COLOURS.get(depth, _SPARE_COLOURS[depth % len(_SPARE_COLOURS)])


@dataclasses.dataclass
class Run:
    """One run directory: its config and its (deduplicated, step-sorted) error curves in percent."""

    path: Path
    config: dict[str, Any]
    train: list[tuple[int, float]]
    test: list[tuple[int, float]]
    bad_lines: int = 0  # unparsable lines (e.g. a line being written while we read)

    @property
    def model(self) -> str:
        return self.config["model"]

    @property
    def seed(self) -> int:
        return int(self.config.get("seed", 0))

    @property
    def num_steps(self) -> int:
        """The effective number of steps (the config's, scaled by ``schedule_scale``)."""
        return scaled_steps(self.config["num_steps"], self.config.get("schedule_scale", 1.0))

    @property
    def boundaries(self) -> tuple[int, ...]:
        scale = self.config.get("schedule_scale", 1.0)
        return tuple(scaled_steps(b, scale) for b in self.config.get("lr_boundaries", ()))

    @property
    def schedule(self) -> str:
        """The schedule in words; only the paper's own numbers are called the paper's schedule."""
        if (self.config["num_steps"], tuple(self.config.get("lr_boundaries", ()))) == (
                PAPER_NUM_STEPS, PAPER_BOUNDARIES) and self.config.get("schedule_scale", 1.0) == 1.0:
            return "paper (64k it)"
        return f"{self.num_steps:,} it (x{self.num_steps / PAPER_NUM_STEPS:.3g} of paper)"

    @property
    def last_step(self) -> int:
        return max([s for s, _ in self.train + self.test], default=0)

    @property
    def finished(self) -> bool:
        return self.last_step >= self.num_steps and bool(self.test) and self.test[-1][0] >= self.num_steps

    @property
    def progress(self) -> str:
        if self.finished:
            return "finished"
        if not self.train and not self.test:
            return "no metrics yet"
        return f"in progress: step {self.last_step:,}/{self.num_steps:,}"

    @property
    def final_test(self) -> float | None:
        """The last test error logged (the final one when ``finished``)."""
        return self.test[-1][1] if self.test else None

    @property
    def final_train(self) -> float | None:
        if not self.train:
            return None
        since = self.train[-1][0] - max(1, FINAL_TRAIN_FRACTION * self.num_steps)
        tail = [e for s, e in self.train if s > since]
        return sum(tail) / len(tail)


def read_metrics(path: Path) -> tuple[dict[str, list[tuple[int, float]]], int]:
    """``{split: [(step, error %)]}`` from ``metrics.jsonl``; the last record of a (split, step) wins."""
    last: dict[tuple[str, int], float] = {}
    bad = 0
    if path.exists():
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if "split" in rec and "error" in rec:
                last[(rec["split"], int(rec["step"]))] = float(rec["error"])
    curves: dict[str, list[tuple[int, float]]] = {}
    for (split, step), err in sorted(last.items(), key=lambda kv: kv[0][1]):
        curves.setdefault(split, []).append((step, err))
    return curves, bad


def load_run(path: str | Path) -> Run:
    path = Path(path)
    cfg = path / "config.json"
    if not cfg.exists():
        raise BadInput(f"{path} holds no run (no config.json)")
    curves, bad = read_metrics(path / "metrics.jsonl")
    config = json.loads(cfg.read_text())
    used = data_dir_used(path / "metrics.jsonl")
    if used and not config.get("data_dir"):
        config["data_dir_used"] = used
    return Run(path, config, curves.get("train", []), curves.get("test", []), bad)


def data_dir_used(path: Path) -> str | None:
    """The TFDS data_dir the run read, from its ``{"event": "data"}`` records (the last one wins)."""
    found = None
    if path.exists():
        for line in path.read_text().splitlines():
            if '"data"' in line:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if rec.get("event") == "data" and rec.get("data_dir"):
                    found = rec["data_dir"]
    return found


def collect_runs(paths: list[str | Path]) -> list[Run]:
    """Runs named by ``paths``: run directories, a population's directory (its members), or folders whose
    sub-directories are runs (runs set aside by ``--start_over``, ``*.old-*``, are skipped there)."""
    runs = []
    for p in map(Path, paths):
        members = population_members(p)
        if members is not None:  # a population: each member is a run
            runs.extend(load_run(d) for d in members)
            continue
        if (p / "config.json").exists():
            runs.append(load_run(p))
            continue
        subs = sorted(d for d in p.iterdir() if (d / "config.json").exists() and ".old-" not in d.name) \
            if p.is_dir() else []
        if not subs:
            raise BadInput(f"{p} holds no run (no config.json in it or in its sub-directories)")
        for d in subs:
            members = population_members(d)
            runs.extend(load_run(m) for m in members) if members is not None else runs.append(load_run(d))
    return runs


def dataset_name(config: dict[str, Any]) -> str:
    """Names the data a run trained on, from its ``data_dir`` (or says that TFDS looked it up)."""
    d = config.get("data_dir") or config.get("data_dir_used")
    if d:
        copy = " (JPEG q75 copy)" if str(Path(d).resolve()).endswith(str(SHARED_COPY)) else ""
        return f"CIFAR-10{copy}, TFDS data_dir {portable_path(d)}"
    env = os.environ.get("TFDS_DATA_DIR")
    now = ""
    if env:
        copy = ", the JPEG q75 copy" if str(Path(env).resolve()).endswith(str(SHARED_COPY)) else ""
        now = f"; $TFDS_DATA_DIR is {portable_path(env)}{copy} where this report was generated"
    return ("CIFAR-10 via TFDS (data_dir not recorded in config.json: found through $TFDS_DATA_DIR or "
            f"~/tensorflow_datasets at training time{now})")


def schedules_note(runs: list[Run]) -> str | None:
    kinds = sorted({(r.num_steps, r.boundaries, r.schedule) for r in runs})
    if len(kinds) < 2:
        return None
    shown = "; ".join(f"{s} (lr drops at {', '.join(f'{b:,}' for b in bs)})" for _, bs, s in kinds)
    return (f"**Mixed schedules**: these runs use {len(kinds)} different schedules ({shown}); errors from "
            "different schedules are not comparable")
