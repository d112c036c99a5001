"""The one definition of the config keys (``resflax.configs``): the experiments built from it are exactly the
configs they were before (a frozen snapshot), and config errors are one line."""

import importlib.util
import json
import sys
from pathlib import Path

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


def test_experiments_are_the_configs_they_were():
    want = json.loads(SNAPSHOT.read_text())
    got = json.loads(json.dumps(all_snapshots()))
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k]["json"] == want[k]["json"], k
        # same keys with the same types (placeholders with theirs); the order of the keys may differ
        assert got[k]["types"] == want[k]["types"], k
        assert (got[k]["locked"], got[k]["type_safe"]) == (want[k]["locked"], want[k]["type_safe"]), k


if __name__ == "__main__":  # writes the snapshot (only ever from the code before the refactor)
    sys.path.insert(0, str(ROOT / "src"))
    rows = [f"{json.dumps(k)}: {json.dumps(v, sort_keys=True)}" for k, v in all_snapshots().items()]
    SNAPSHOT.write_text("{\n" + ",\n".join(rows) + "\n}\n")


def test_resumable_and_added_keys_are_those_of_before():
    from resflax import configs  # noqa: PLC0415
    from resflax.train import workdir as wd  # noqa: PLC0415

    assert wd.RESUMABLE_KEYS == configs.RESUMABLE_KEYS == {
        "data_dir", "checkpoint_every_steps", "keep_checkpoints", "log_every_steps", "progress", "eval_every_steps",
        "eval_batch_size", "num_steps", "distributed", "coordinator_address", "num_processes", "process_id",
        "preemption_check_every_steps", "peer_timeout_s", "loader_workers", "loader_threads", "mean_cache_dir",
        "multiscale_scales"}
    assert wd.ADDED_KEYS == configs.ADDED_KEYS == {
        "mean": "pixel", "std": None, "population": {"seeds": [], "residual": [], "vectorize": "auto"}}


def test_every_experiment_key_is_defined_once_with_its_type():
    from resflax import configs  # noqa: PLC0415

    for name in configs.EXPERIMENTS:
        c = load(name).get_config(None)
        flat = set()
        for k, v in c.items():  # a group's keys as population.seeds, ...
            flat |= {f"{k}.{sub}" for sub in v.keys()} if hasattr(v, "keys") else {k}
        assert flat == {k.name for k in configs.keys_of(name)}, name
        configs.validate(c)  # the defaults are valid
