"""Populations (``train.members``, trained by ``train.loop``): K networks in one program, each member exactly its
single run."""

import json
import re
import shutil

import jax
import numpy as np
import pytest
from test_train import mock, tiny_config

from resflax import cli
from resflax.errors import BadInput, DivergenceError
from resflax.train import loop, members
from resflax.train import state as state_lib

IGNORED = ("img_per_s", "population_img_per_s")


def pop_config(seeds=(0, 1), residual=(0, 1), **kw):
    c = tiny_config(**kw)
    c.population.seeds = seeds
    c.population.residual = residual
    return c


def lines(workdir):
    """metrics.jsonl without the timing fields and the data/config records (they name the run's setting)."""
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in IGNORED} for r in rows if r.get("event") not in ("data", "config")]


@pytest.fixture(scope="module")
def pop(tmp_path_factory):
    """A finished population (plain8/resnet8 x seeds 0, 1; checkpoints at 3 and 6) and the four single runs."""
    root = tmp_path_factory.mktemp("pop")
    with mock():
        result = loop.train_and_evaluate(pop_config(), str(root / "pop"))
        singles = {m["name"]: loop.train_and_evaluate(tiny_config(model=m["model"], seed=m["seed"]),
                                                      str(root / "single" / m["name"]))
                   for m in result["members"]}
    return root, result, singles


def test_members_named_and_ordered():
    c = pop_config(seeds=(3, 1), residual=(0, 1))
    assert [(m.name, m.model, m.seed, m.residual) for m in members.members(c)] == [
        ("plain8-seed3", "plain8", 3, False), ("plain8-seed1", "plain8", 1, False),
        ("resnet8-seed3", "resnet8", 3, True), ("resnet8-seed1", "resnet8", 1, True)]
    # seeds alone: the model's own kind; residual alone: the config's seed
    assert [m.name for m in members.members(pop_config(seeds=(0, 2), residual=()))] == ["resnet8-seed0",
                                                                                             "resnet8-seed2"]
    assert [m.name for m in members.members(pop_config(seeds=(), residual=(1, 0), seed=5))] == [
        "resnet8-seed5", "plain8-seed5"]


@pytest.mark.slow
def test_member_is_its_single_run_bit_for_bit(pop):
    root, result, singles = pop
    assert result["finished"] and result["step"] == 6
    assert [m["name"] for m in result["members"]] == ["plain8-seed0", "plain8-seed1", "resnet8-seed0",
                                                      "resnet8-seed1"]
    digests = set()
    for m in result["members"]:
        single = singles[m["name"]]
        assert m["state_digest"] == single["state_digest"], m["name"]
        assert m["test_error"] == single["test_error"]
        member_dir = root / "pop" / "members" / m["name"]
        # the member's directory is that single run's: same metrics line for line, same config.json
        assert lines(member_dir) == lines(root / "single" / m["name"])
        assert (json.loads((member_dir / "config.json").read_text())
                == json.loads((root / "single" / m["name"] / "config.json").read_text()))
        digests.add(m["state_digest"])
    assert len(digests) == 4  # four different networks
    status = json.loads((root / "pop" / "population.json").read_text())
    assert [x["status"] for x in status["members"]] == ["finished"] * 4


@pytest.mark.slow
def test_member_directory_continues_as_a_single_run(pop, tmp_path):
    """``resflax train`` on a member's directory with the single run's config is the same experiment: it
    resumes from the member's checkpoint (here: already finished) with its digest."""
    root, result, _ = pop
    m = result["members"][1]
    d = tmp_path / "member"
    shutil.copytree(root / "pop" / "members" / m["name"], d)
    with mock():
        again = loop.train_and_evaluate(tiny_config(model=m["model"], seed=m["seed"]), str(d))
    assert again["step"] == 6 and again["state_digest"] == m["state_digest"]


@pytest.mark.slow
def test_resume_after_a_stop_between_two_members_saves(pop, tmp_path):
    """Member 0 saved step 6, the others did not (killed in between): the population resumes every member at
    step 3, sets member 0's step 6 aside, and ends bit for bit as the uninterrupted run."""
    root, result, _ = pop
    d = tmp_path / "pop"
    shutil.copytree(root / "pop", d)
    for m in result["members"][1:]:
        shutil.rmtree(d / "members" / m["name"] / "checkpoints" / "6")
    with mock():
        again = loop.train_and_evaluate(pop_config(), str(d))
    assert [m["state_digest"] for m in again["members"]] == [m["state_digest"] for m in result["members"]]
    first = d / "members" / result["members"][0]["name"]
    assert [p.name.split("-")[:2] for p in (first / "checkpoints_damaged").iterdir()] == [["6", "ahead"]]
    for m in result["members"]:
        assert lines(d / "members" / m["name"]) == lines(root / "pop" / "members" / m["name"])


@pytest.mark.slow
def test_resume_on_another_device_count_is_recorded_for_every_member(pop, tmp_path, capsys):
    """The one loop records a device-count change for a population as for a single run: every member's
    metrics.jsonl gets the devices_changed event (the population's own loop used to write none)."""
    root, result, _ = pop
    d = tmp_path / "pop"
    shutil.copytree(root / "pop", d)
    for m in result["members"]:
        shutil.rmtree(d / "members" / m["name"] / "checkpoints" / "6")
        meta = d / "members" / m["name"] / "checkpoints" / "3" / "meta" / "metadata"
        saved = json.loads(meta.read_text())
        meta.write_text(json.dumps({**saved, "devices": saved["devices"] + 1}))
    capsys.readouterr()
    with mock():
        again = loop.train_and_evaluate(pop_config(), str(d))
    assert again["step"] == 6
    assert "checkpoint 3 was written on" in capsys.readouterr().out
    for m in result["members"]:
        rows = [json.loads(x) for x in (d / "members" / m["name"] / "metrics.jsonl").read_text().splitlines()]
        ev = [r for r in rows if r.get("event") == "devices_changed"]
        assert len(ev) == 1 and ev[0]["step"] == 3 and ev[0]["to"] == ev[0]["from"] - 1, m["name"]


def _poison(monkeypatch, seeds):
    """Members with these seeds start from NaN weights: their first loss is not finite."""
    real = state_lib.init_state

    def init(model, tx_fn, seed, image_shape, warmup):
        s = real(model, tx_fn, seed, image_shape, warmup)
        if seed in seeds:
            s = s.replace(params=jax.tree_util.tree_map(lambda a: a * np.float32("nan"), s.params))
        return s

    monkeypatch.setattr(state_lib, "init_state", init)


@pytest.mark.slow
def test_a_diverging_member_stops_alone(pop, tmp_path, monkeypatch):
    root, result, _ = pop
    _poison(monkeypatch, {1})
    with mock():
        out = loop.train_and_evaluate(pop_config(), str(tmp_path / "p"))
        again = loop.train_and_evaluate(pop_config(), str(tmp_path / "p"))  # a rerun leaves it stopped
    status = {m["name"]: m["status"] for m in out["members"]}
    assert status == {"plain8-seed0": "finished", "plain8-seed1": "diverged", "resnet8-seed0": "finished",
                      "resnet8-seed1": "diverged"}
    want = {m["name"]: m["state_digest"] for m in result["members"]}
    for m in out["members"] + again["members"]:
        if m["status"] == "finished":  # the others trained exactly as without the diverging members
            assert m["state_digest"] == want[m["name"]]
    d = tmp_path / "p" / "members" / "plain8-seed1"
    events = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    diverged = [e for e in events if e.get("event") == "diverged"]
    assert len(diverged) == 1 and diverged[0]["step"] == 1 and "no checkpoint" in diverged[0]["message"]
    assert not (d / "checkpoints").exists() or not any((d / "checkpoints").iterdir())
    saved = json.loads((tmp_path / "p" / "population.json").read_text())["members"]
    assert [m["status"] for m in saved] == ["finished", "diverged", "finished", "diverged"]


@pytest.mark.slow
def test_every_member_diverging_ends_the_run(tmp_path, monkeypatch):
    _poison(monkeypatch, {0})
    with mock(), pytest.raises(DivergenceError, match="every member"):
        loop.train_and_evaluate(pop_config(seeds=(0,)), str(tmp_path / "p"))


@pytest.mark.slow
def test_vmap_member_agrees_with_its_single_run(tmp_path):
    """vectorize=vmap: grouped convolutions and the residual gate sum in another order, so a member is its
    single run to float32 rounding after a step, not bit for bit."""
    from resflax.train.evaluate import restore  # noqa: PLC0415

    with mock():
        out = loop.train_and_evaluate(_vmap_config(), str(tmp_path / "v"))
        for m in out["members"]:
            loop.train_and_evaluate(tiny_config(model=m["model"], seed=m["seed"], num_steps=1),
                                    str(tmp_path / m["name"]))
    assert [m["name"] for m in out["members"]] == ["plain8-seed1", "resnet8-seed1"]
    for m in out["members"]:
        _, _, a = restore(tmp_path / "v" / "members" / m["name"], locate_data=False)
        _, _, b = restore(tmp_path / m["name"], locate_data=False)
        diff = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
                   for x, y in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params)))
        assert diff < 1e-4, (m["name"], diff)


def _vmap_config():
    c = pop_config(seeds=(1,), residual=(0, 1), num_steps=1, checkpoint_every_steps=1)
    c.population.vectorize = "vmap"
    return c


@pytest.mark.slow
def test_eval_report_and_responses_take_the_population(pop, capsys, tmp_path):
    root, result, _ = pop
    d = root / "pop"
    with mock():
        assert cli.main(["eval", "--workdir", str(d)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 4
    for m, line in zip(result["members"], out):
        assert line.startswith(f"{m['name']}: {m['model']} step 6") and m["state_digest"] in line
    assert cli.main(["report", str(d), "--out", str(tmp_path / "report")]) == 0
    out = capsys.readouterr().out
    for m in result["members"]:
        assert f"{m['model']} seed {m['seed']}" in out
    with mock():
        assert cli.main(["responses", "--workdir", str(d), "--max_images", "16", "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert sum(f"members/{m['name']}: " in out for m in result["members"]) == 4


@pytest.mark.parametrize("change, message", [
    (dict(seeds=(0, 0)), "repeats a seed"),
    (dict(residual=(2,)), "population.residual"),
    (dict(vectorize="pmap"), "population.vectorize"),
    (dict(shortcut="B"), "option-A"),
    (dict(model="resnet18"), "ImageNet model"),
    (dict(distributed="auto"), "one process"),
])
def test_bad_population_refused_before_writing(tmp_path, change, message):
    c = pop_config()
    for k, v in change.items():
        if k in ("seeds", "residual", "vectorize"):
            c.population[k] = v
        else:
            c[k] = v
    with mock(), pytest.raises(BadInput, match=message):
        loop.train_and_evaluate(c, str(tmp_path / "p"))
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("population", ["yes", "no"])
def test_make_targets_use_populations_when_asked(population):
    """``make cifar-degradation`` / ``cifar-table6``: one population per depth (and one for the five ResNet-110
    seeds) with POPULATION=yes (auto: on a GPU/TPU), one run after the other with POPULATION=no (auto: CPU)."""
    import subprocess  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    root = Path(__file__).resolve().parents[1]
    out = {t: subprocess.run(["make", "-n", "--no-print-directory", t, f"POPULATION={population}",
                              "SCHEDULE_SCALE=0.5"], cwd=root, capture_output=True, text=True, check=True).stdout
           for t in ("cifar-degradation", "cifar-table6")}
    # where CIFAR-10 is read from is not the point here
    out = {t: re.sub(r" +", " ", re.sub(r"--config\.data_dir=\S+", "", o)) for t, o in out.items()}
    if population == "yes":
        assert "for d in 20 32 44 56 110; do" in out["cifar-degradation"]
        assert ("--config=experiments/cifar10.py:resnet$d,schedule_scale=0.5 --config.population.residual=0,1 "
                "--workdir=runs/cifar-pop$d-s0.5") in out["cifar-degradation"]
        assert "--config.population.seeds=0,1,2,3,4 --workdir=runs/cifar-resnet110-seeds-s0.5" in out["cifar-table6"]
        assert "report runs/cifar-pop20-s0.5 runs/cifar-pop32-s0.5" in out["cifar-degradation"]
    else:
        assert "population" not in out["cifar-degradation"] + out["cifar-table6"]
        assert "runs/cifar-resnet110-seed$s-s0.5" in out["cifar-table6"]
        assert "report runs/cifar-plain20-s0.5" in out["cifar-degradation"]
