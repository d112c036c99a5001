"""The one definition of the config keys (``resflax.configs``): the experiments built from it are exactly the
configs they were before (a frozen snapshot), and config errors are one line."""

import importlib.util
import json
import sys
from pathlib import Path

import ml_collections
import pytest

from resflax import configs
from resflax.errors import BadInput
from resflax.train import workdir as wd

ROOT = Path(__file__).resolve().parents[1]
SNAPSHOT = ROOT / "tests" / "data" / "configs_before.json"

CIFAR_ARGS = [
    None, "", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet1202", "plain20", "plain32",
    "plain44", "plain56", "plain110", "runlocal", "runlocal,seed=1", "runlocal,schedule_scale=0.5",
    "resnet8", "resnet18", "vgg16", "resnet110,seed=3,val_examples=5000", "resnet1202,schedule_scale=0.1",
    "resnet56,seed=2,val_examples=5000,schedule_scale=0.5", "resnet20,schedule_scale=1", "plain110,seed=4",
]
IMAGENET_ARGS = [
    None, "", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "plain18", "plain34", "vgg16",
    "vgg19", "tiny", "resnet20", "resnet110", "resnet34,shortcut=A", "resnet34,shortcut=B",
    "resnet34,shortcut=C", "resnet50,shortcut=A", "plain18,shortcut=B", "vgg16,shortcut=A", "tiny,shortcut=C",
    "tiny,seed=2,val_examples=10,schedule_scale=0.5", "vgg19,val_examples=10000,schedule_scale=0.1",
    "resnet18,shortcut=B,seed=4", "resnet152,schedule_scale=2",
]


def load(name):
    spec = importlib.util.spec_from_file_location(f"exp_{name}", ROOT / "experiments" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _types(c) -> dict:
    """Each key's Python type (a placeholder's declared type; a nested group's keys), in the key order."""
    from ml_collections import ConfigDict, FieldReference  # noqa: PLC0415

    out = {}
    for key, field in c._fields.items():
        if isinstance(field, ConfigDict):
            out[key] = _types(field)
        elif isinstance(field, FieldReference):
            out[key] = f"placeholder {field.get_type().__name__}"
        else:
            kind = type(field).__name__
            if isinstance(field, tuple):
                kind += "[" + ",".join(type(v).__name__ for v in field) + "]"
            out[key] = kind
    return out


def snapshot(name, arg) -> dict:
    c = load(name).get_config(arg)
    return {"json": json.loads(c.to_json()), "types": _types(c), "locked": c.is_locked,
            "type_safe": c.is_type_safe}


def all_snapshots() -> dict:
    return {f"{name}:{arg}": snapshot(name, arg)
            for name, args in (("cifar10", CIFAR_ARGS), ("imagenet", IMAGENET_ARGS)) for arg in args}


# Deliberate changes since the snapshot: key -> (its type, the value of each experiment; a callable of the
# snapshot's config name for a value that depends on it). The snapshot's runs meant the key's ``added`` value.
SINCE = {
    # the paper's BN groups of 32 on ImageNet (256 over 8 GPUs); the CPU-sized tiny run: 2 groups of 8
    "bn_group_size": ("int", {"cifar10": lambda name: 0,
                              "imagenet": lambda name: 8 if name.startswith("imagenet:tiny") else 32}),
}


def _since(name: str, entry: dict) -> dict:
    """A snapshot entry with the deliberate changes made since (``SINCE``)."""
    for key, (kind, values) in SINCE.items():
        entry["json"][key] = values[name.split(":")[0]](name)
        entry["types"][key] = kind
    return entry


def test_experiments_are_the_configs_they_were():
    want = {k: _since(k, v) for k, v in json.loads(SNAPSHOT.read_text()).items()}
    got = json.loads(json.dumps(all_snapshots()))
    assert sorted(got) == sorted(want)
    # keys added since then at their `added` value; those in SINCE were changed deliberately (want has them)
    added = {k: v for k, v in configs.ADDED_KEYS.items() if k not in ("mean", "std", "population", *SINCE)}
    for k in want:
        # keys added since the snapshot, each at its `added` value (what a config without it meant), and else the same
        assert {a: got[k]["json"].pop(a) for a in added} == added, k
        assert got[k]["json"] == want[k]["json"], k
        # same keys with the same types (placeholders with theirs); the order of the keys may differ
        for t in added:
            got[k]["types"].pop(t)
        assert got[k]["types"] == want[k]["types"], k
        assert (got[k]["locked"], got[k]["type_safe"]) == (want[k]["locked"], want[k]["type_safe"]), k


if __name__ == "__main__":  # wrote the snapshot, from the code before the refactor (commit 984bf9c)
    rows = [f"{json.dumps(k)}: {json.dumps(v, sort_keys=True)}" for k, v in all_snapshots().items()]
    SNAPSHOT.write_text("{\n" + ",\n".join(rows) + "\n}\n")


def test_resumable_and_added_keys_are_those_of_before():
    assert wd.RESUMABLE_KEYS == configs.RESUMABLE_KEYS == {
        "data_dir", "checkpoint_every_steps", "keep_checkpoints", "log_every_steps", "progress", "eval_every_steps",
        "eval_batch_size", "num_steps", "distributed", "coordinator_address", "num_processes", "process_id",
        "preemption_check_every_steps", "peer_timeout_s", "loader_workers", "loader_threads", "mean_cache_dir",
        "multiscale_scales"}
    assert wd.ADDED_KEYS == configs.ADDED_KEYS == {
        "mean": "pixel", "std": None, "population": {"seeds": [], "residual": [], "vectorize": "auto"},
        "channel_mean": [0.485, 0.456, 0.406], "conv_init": "fan_in", "bn_group_size": 0}


def test_every_experiment_key_is_defined_once_with_its_type():
    for name in configs.EXPERIMENTS:
        c = load(name).get_config(None)
        flat = set()
        for k, v in c.items():  # a group's keys as population.seeds, ...
            flat |= {f"{k}.{sub}" for sub in v.keys()} if hasattr(v, "keys") else {k}
        assert flat == {k.name for k in configs.keys_of(name)}, name
        configs.validate(c)  # the defaults are valid


def test_validate_refuses_each_bad_value_in_one_line():

    cases = {
        "dtype": ("float64", "dtype must be 'float32' or 'bfloat16'"),
        "weight_decay_on": ("bias", "weight_decay_on must be 'all' or 'kernels'"),
        "batch_size": (0, "batch_size must be positive"),
        "peer_timeout_s": (-1, "peer_timeout_s must be positive"),
        "schedule_scale": (0.0, "schedule_scale must be positive"),
        "scan_min_blocks": (-1, "scan_min_blocks must be >= 0"),
        "mean": ("median", "mean must be 'pixel' or 'channel'"),
        "std": ((0.2, 0.2), "std must be 3 numbers > 0 or None"),
        "lr_schedule": ("cosine", "lr_schedule must be 'fixed' or 'plateau'"),
        "lr_scaling": ("sqrt", "lr_scaling must be 'none' or 'linear'"),
        "loader_workers": (-2, "loader_workers must be >= -1"),
        "loader_threads": (-1, "loader_threads must be >= 0"),
        "lr_warmup_steps": (-5, "lr_warmup_steps must be >= 0"),
        "population.vectorize": ("pmap", "population.vectorize must be 'auto', 'vmap' or 'loop'"),
        "seed": (None, "seed must be an integer"),
    }
    for key, (value, words) in cases.items():
        imagenet = configs.KEYS[key].only == "imagenet"
        c = load("imagenet").get_config("tiny") if imagenet else load("cifar10").get_config("resnet8")
        *group, last = key.split(".")
        (c[group[0]] if group else c)[last] = value
        with pytest.raises(BadInput) as e:
            configs.validate(c)
        assert str(e.value).startswith(words) and "\n" not in str(e.value), (key, str(e.value))
    # a config.json's lists (tuples in the experiment), an older one without the added keys: valid
    old = json.loads(load("cifar10").get_config("resnet20").to_json())
    for k in ("mean", "std", "population", "peer_timeout_s"):
        del old[k]
    configs.validate(ml_collections.ConfigDict(old))
    configs.validate(ml_collections.ConfigDict(json.loads(load("imagenet").get_config("tiny").to_json())))


def test_configs_and_experiments_load_without_jax():
    import subprocess  # noqa: PLC0415

    code = ("import sys, resflax.configs, resflax.train.workdir, importlib.util as u\n"
            "for n in ('cifar10', 'imagenet'):\n"
            f"    s = u.spec_from_file_location(n, {str(ROOT / 'experiments')!r} + f'/{{n}}.py')\n"
            "    m = u.module_from_spec(s); s.loader.exec_module(m); m.get_config()\n"
            "print(sorted(k for k in sys.modules if k.split('.')[0] in ('jax', 'flax', 'tensorflow')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr[-2000:] + r.stdout


def test_unknown_config_key_is_one_line_with_the_close_match(tmp_path, capsys):
    import os  # noqa: PLC0415
    import subprocess  # noqa: PLC0415

    w = tmp_path / "w"
    r = subprocess.run([sys.executable, "-m", "resflax.cli", "train", "--config=experiments/cifar10.py:resnet8",
                        f"--workdir={w}", "--config.batchsize=3"], capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.splitlines() == ["resflax: error: unknown config key 'batchsize' (did you mean 'batch_size'?)"]
    assert not w.exists()
    from resflax import cli  # noqa: PLC0415

    for arg, line in [("--config.nonsense_key=1", "unknown config key 'nonsense_key'"),
                      ("--config.population.seedz=1", "unknown config key 'population.seedz' (did you mean "
                                                      "'population.seeds'?)"),
                      ("--config.populatio.seeds=1", "unknown config key 'populatio.seeds' (did you mean "
                                                     "'population.seeds'?)")]:
        assert cli.main(["train", "--config=experiments/cifar10.py:resnet8", f"--workdir={w}", arg]) == 2
        assert capsys.readouterr().err.splitlines() == [f"resflax: error: {line}"], arg
        assert not w.exists()


def test_train_help_lists_the_keys_of_each_experiment(capsys):
    from resflax import cli  # noqa: PLC0415

    assert cli.main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    only = {name: out.split(f"only in {path}")[1].split("only in")[0] for name, path in configs.EXPERIMENTS.items()}
    for k in configs.KEYS.values():
        line = next(ln for ln in out.splitlines() if ln.strip().startswith(f"--config.{k.name} "))
        assert f"= {k.default!r}  # {k.help}" in line, line
        assert (f"--config.{k.name} " in only[k.only]) if k.only else not any(
            f"--config.{k.name} " in o for o in only.values()), k.name
    assert "resflax train --help --config=experiments/imagenet.py" in out
    assert cli.main(["train", "--help", "--config=experiments/imagenet.py:tiny"]) == 0
    out = capsys.readouterr().out
    assert "--config.batch_size" in out and "= 16  # global batch" in out and "population" not in out
    assert f"# {configs.KEYS['lr_schedule'].help}" in out
