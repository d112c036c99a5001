"""``resflax report`` (Fig. 6, Table 6) and ``resflax responses`` (Fig. 7): values, marks, files.

Fake run directories are written here (config.json + metrics.jsonl); one tiny real ResNet-8 run trained on
TFDS mock data checks the whole path from ``train_and_evaluate`` to the report and the layer responses.
"""

import csv
import json
import re
from pathlib import Path

import jax
import numpy as np
import pytest
from test_train import mock, tiny_config

from resflax.analysis import report, responses
from resflax.analysis.runs import portable_path
from resflax.cli import main
from resflax.models import get_model
from resflax.train import loop


def write_run(root: Path, name: str, model: str, seed: int = 0, scale: float = 0.001, steps: int | None = None,
              test: dict | None = None, train_every: int = 8, data_dir: str | None = None, extra: str = "",
              offset: float = 0.0) -> Path:
    """A run dir of ``model`` on 64k*scale steps whose metrics reach ``steps`` (default: the end);
    ``test`` maps step -> test error (the last entry for a step wins); training error 50 - step/2 + offset."""
    d = root / name
    d.mkdir(parents=True)
    cfg = dict(model=model, seed=seed, num_steps=64_000, schedule_scale=scale, lr_boundaries=[32_000, 48_000],
               batch_size=128, data_dir=data_dir, shortcut=None)
    (d / "config.json").write_text(json.dumps(cfg))
    n = round(64_000 * scale)
    steps = n if steps is None else steps
    lines = [{"step": s, "split": "train", "loss": 1.0, "error": 50 - s / 2 + offset, "lr": 0.1, "epoch": s / 390}
             for s in range(train_every, steps + 1, train_every)]
    lines += [{"step": s, "split": "test", "error": e, "loss": 1.0, "epoch": s / 390} for s, e in (test or {}).items()]
    (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + extra)
    return d


def table(path: Path) -> dict[str, dict[str, str]]:
    """table6.md rows keyed by model label."""
    lines = [ln for ln in path.read_text().splitlines() if ln.startswith("|")]
    keys = [k.strip() for k in lines[0].strip("|").split("|")]
    rows = [dict(zip(keys, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[2:]]
    return {r["model"]: r for r in rows}


def nonempty_png(p: Path) -> bool:
    return p.exists() and p.stat().st_size > 1000 and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_table_seeds_unfinished_duplicates(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "out"
    shared = str(tmp_path / "shared" / "tfds")
    for seed, err in ((0, 9.0), (1, 8.0)):
        write_run(runs, f"r20-s{seed}", "resnet20", seed, test={32: 30.0, 64: err}, data_dir=shared)
    write_run(runs, "r20-s2", "resnet20", 2, steps=32, test={32: 31.0}, data_dir=shared)  # in progress
    write_run(runs, "p20", "plain20", test={64: 12.5}, data_dir=shared)
    # A resumed run logs a step twice: the last record wins. Plus half a line being written right now.
    write_run(runs, "p56", "plain56", steps=40, test={32: 50.0}, data_dir=shared,
              extra=json.dumps({"step": 32, "split": "test", "error": 40.0}) + "\n" + '{"step": 40, "spl')
    write_run(runs.parent / "elsewhere", "r20.old-2024", "resnet20")  # not named: not reported

    assert main(["report", str(runs), "--out", str(out)]) == 0
    t = table(out / "table6.md")
    assert set(t) == {"ResNet-20", "plain-20", "plain-56"}
    r20 = t["ResNet-20"]
    # finished seeds only: mean 8.5, sample std 0.71, best 8.0; paper 8.75
    assert r20["ours: test error %"] == "8.50 ± 0.71 (best 8.00, n=2)"
    assert r20["ours − paper"] == "-0.25"
    assert r20["params"] == "269,722" and r20["depth"] == "20" and r20["paper error %"] == "8.75"
    assert r20["finished"] == "2 of 3 (seed 2: step 32/64)" and r20["seeds"] == "0,1,2"
    assert r20["schedule"] == "64 it (x0.001 of paper)"
    assert t["plain-20"]["ours: test error %"] == "12.50" and t["plain-20"]["finished"] == "yes"
    assert t["plain-20"]["paper error %"] == "– (curves only)" and t["plain-20"]["ours − paper"] == "–"
    assert t["plain-56"]["ours: test error %"] == "40.00 †"  # latest, not final, deduplicated
    assert t["plain-56"]["finished"] == "no (seed 0: step 40/64)"

    md = (out / "report.md").read_text()
    assert f"`resflax report {runs} --out {out}`" in md
    assert "CIFAR-10 (JPEG q75 copy)" in md and "Mixed schedules" not in md
    assert "not the paper's 64k iterations" in md
    assert "Skipped 1 unreadable metrics line" in md
    assert re.search(r"\| \S*p56 \| plain-56 \| 0 \| 128 \| .* \| in progress: step 40/64 \|", md)
    assert "findings" not in md  # one finished depth per family: nothing to compare
    for name in ("fig6.png", "fig6_plain.png", "fig6_resnet.png"):
        assert nonempty_png(out / name), name
    assert not (out / "fig6_resnet110_1202.png").exists()


def test_report_mixed_schedules_and_resnet110(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "out"
    write_run(runs, "a", "resnet110", 0, test={64: 7.0})
    write_run(runs, "b", "resnet110", 1, test={64: 8.0})
    write_run(runs, "c", "resnet20", scale=0.002, test={128: 10.0})
    write_run(runs, "d", "plain20", test={64: 10.0})
    write_run(runs, "e", "plain56", test={64: 10.0}, offset=1.0)
    assert main(["report", *(str(runs / n) for n in "abcde"), "--out", str(out)]) == 0
    t = table(out / "table6.md")
    # like with like: the mean against the paper's mean (6.61), the best against its best of 5 (6.43)
    assert t["ResNet-110"]["ours − paper"] == "+0.89 vs paper mean; best +0.57 vs paper best"
    assert t["ResNet-20"]["schedule"] == "128 it (x0.002 of paper)"
    md = (out / "report.md").read_text()
    assert "**Mixed schedules**: these runs use 2 different schedules" in md
    assert "Mixed schedules" in (out / "table6.md").read_text()
    # final training error: records in the last 5% of 64 steps (> 60.8), i.e. step 64: 50 - 32 (+ 1 for plain-56)
    assert "plain-20 18.00%, plain-56 19.00% — deeper is higher throughout (the paper's finding): **yes**" in md
    assert "ResNets, " not in md  # ResNet-20 and -110 ran different schedules: not compared


def test_fig6_panels_follow_the_paper():
    def run(model):
        return report.Run(Path(model), {"model": model, "num_steps": 10, "schedule_scale": 1.0}, [(10, 1.0)],
                          [(10, 2.0)])

    panels = report.fig6_panels([run(m) for m in ("plain20", "plain56", "resnet20", "resnet110", "resnet1202")])
    assert [(stem, sorted(r.model for r in rs)) for stem, _, rs in panels] == [
        ("plain", ["plain20", "plain56"]),
        ("resnet", ["resnet110", "resnet20"]),
        ("resnet110_1202", ["resnet110", "resnet1202"]),
    ]
    assert report.colour(56) == report.colour(56) != report.colour(20)
    assert report.auto_ymax([run("resnet20")]) == 20.0


def test_report_refuses_dirs_without_runs(tmp_path, capsys):
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "holds no run" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------ a tiny real run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tiny") / "resnet8"
    with mock():
        result = loop.train_and_evaluate(tiny_config(num_steps=4, lr_boundaries=(2, 3), eval_every_steps=2),
                                         str(workdir))
    return workdir, result


def test_report_on_a_real_run(tiny_run, tmp_path):
    workdir, result = tiny_run
    assert main(["report", str(workdir), "--out", str(tmp_path)]) == 0
    row = table(tmp_path / "table6.md")["ResNet-8"]
    assert row["ours: test error %"] == f"{result['test_error']:.2f}"
    assert row["finished"] == "yes" and row["params"] == "75,290" and row["schedule"] == "4 it (x6.25e-05 of paper)"
    assert nonempty_png(tmp_path / "fig6.png")


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_responses_on_a_real_run(tiny_run, tmp_path):
    workdir, _ = tiny_run
    with mock():  # 64 test images
        assert main(["responses", "--workdir", str(workdir), "--out", str(tmp_path), "--batch_size", "24"]) == 0
    rows = read_csv(tmp_path / "responses.csv")
    assert list(rows[0]) == ["run", "model", "layer_index", "layer_name", "std"]
    assert len(rows) == 7  # ResNet-8: the stem and 2 per block, 3 blocks
    assert [r["layer_index"] for r in rows] == [str(i) for i in range(1, 8)]
    assert [r["layer_name"] for r in rows] == ["stem_bn"] + [f"stage{i}/block0/bn{k}" for i in (1, 2, 3)
                                                             for k in (1, 2)]
    run = portable_path(str(workdir))  # reports write paths without the machine's absolute prefix
    assert all(r["run"] == run and r["model"] == "resnet8" and float(r["std"]) > 0 for r in rows)
    assert nonempty_png(tmp_path / "fig7.png")
    assert "| 64 | 7 |" in (tmp_path / "responses.md").read_text()  # every test image, 7 layers


def test_response_stds_equal_a_direct_computation():
    """Batched, padded and masked accumulation gives the std of all values of all images at once."""
    model = get_model("resnet20")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    mean = rng.uniform(0.3, 0.6, (32, 32, 3)).astype(np.float32)
    variables = model.init(jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3), np.float32), train=False)
    got = responses.response_stds(model, variables, images, mean, batch_size=4)  # 4 + 4 + 2 (padded)
    assert len(got) == 19  # ResNet-20: every 3x3 conv
    _, state = model.apply(variables, images.astype(np.float32) / 255.0 - mean, train=False,
                           mutable=["intermediates"])
    direct = responses._flatten(state["intermediates"])
    assert [n for n, _ in got] == responses.layer_names(model, state["intermediates"])
    assert [n for n, _ in got][:3] == ["stem_bn", "stage1/block0/bn1", "stage1/block0/bn2"]
    for name, std in got:
        np.testing.assert_allclose(std, np.std(np.asarray(direct[name], np.float64)), rtol=1e-4, err_msg=name)


def test_fig7_overlays_runs(tmp_path):
    results = [{"run": f"runs/{m}", "model": m, "step": 1, "images": 5, "data_dir": "d",
                "layers": [(f"l{i}", 1.0 / (i + 1)) for i in range(n)]} for m, n in (("plain20", 19), ("resnet56", 55))]
    paths = responses.write_responses(results, tmp_path, "resflax responses ...")
    assert nonempty_png(paths["fig7"])
    rows = read_csv(paths["csv"])
    assert len(rows) == 19 + 55
    assert [r["layer_index"] for r in rows if r["model"] == "resnet56"] == [str(i) for i in range(1, 56)]


def test_reference_column(tmp_path):
    """``--reference``: another implementation's runs (the PyTorch reference) fill a Table 6 column for the
    same model and schedule only; without it the table keeps its columns."""
    runs, refs, out = tmp_path / "runs", tmp_path / "refs", tmp_path / "out"
    write_run(runs, "r20", "resnet20", test={64: 9.0})
    write_run(runs, "p20", "plain20", test={64: 12.0})
    for seed, err in ((0, 8.5), (1, 9.5)):
        d = write_run(refs, f"torch-r20-s{seed}", "resnet20", seed, test={64: err})
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, "framework": "pytorch", "device": "cpu"}))
    write_run(refs, "torch-r20-other-schedule", "resnet20", scale=0.002, test={128: 1.0})
    assert main(["report", str(runs), "--reference", str(refs), "--out", str(out)]) == 0
    t = table(out / "table6.md")
    assert t["ResNet-20"]["reference: test error %"] == "9.00 ± 0.71 (best 8.50, n=2)"
    assert t["plain-20"]["reference: test error %"] == "–"
    assert "pytorch on cpu" in (out / "table6.md").read_text()
    assert main(["report", str(runs), "--out", str(tmp_path / "plain")]) == 0
    assert "reference: test error %" not in table(tmp_path / "plain" / "table6.md")["ResNet-20"]
