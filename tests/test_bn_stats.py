"""``resflax bn-stats`` (issue 25): a run's BatchNorm statistics replaced by their average over N training
batches (train-mode forward passes with the training augmentation, no update), written as a new run beside the
untouched source; and BN group sizes that cannot be formed are refused in one line."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tree_snapshot
from test_speed_numerics import assert_trees_close
from test_train import mock

from resflax import cli
from resflax.data import augment, cifar10
from resflax.errors import BadInput
from resflax.models import fastops
from resflax.train import build, evaluate
from resflax.train import step as step_lib
from resflax.train.distributed import to_host

BATCHES = 3


def _direct(config, state, batches):
    """The average over the training batches ``state.step .. + batches - 1`` (drawn and augmented as the train
    step does) of each BN layer's batch statistics, per device (``bn_group_size`` 0: each device's slice) and
    averaged over the devices, computed here without the step."""
    data = cifar10.load(config.data_dir or None, config.val_examples)
    images, mean = jnp.asarray(data.train.images), jnp.asarray(data.mean)
    model = build.model_from_config(config).clone(bn_momentum=0.0)
    rng_data, rng_aug = step_lib._keys(state)
    b, ndev = config.batch_size, jax.device_count()
    per_batch = []
    for i in range(batches):
        step = int(state.step) + i
        gidx = step_lib.batch_indices(rng_data, jnp.asarray(step), len(data.train.labels), b)
        keys = jax.vmap(jax.random.fold_in, (None, 0))(rng_aug, step * b + jnp.arange(b))
        x = augment.train_augment(images[gidx], mean, keys)
        slices = [model.apply({"params": state.params, "batch_stats": state.batch_stats}, xs, train=True,
                              mutable=["batch_stats"])[1]["batch_stats"] for xs in jnp.split(x, ndev)]
        per_batch.append(jax.tree_util.tree_map(lambda *a: np.mean(np.asarray(a, np.float64), 0), *slices))
    return jax.tree_util.tree_map(lambda *a: np.mean(a, 0).astype(np.float32), *per_batch)


def test_bn_stats_writes_a_new_run_with_the_average_of_n_training_batches(pristine, tmp_path, capsys):
    src = tmp_path / "run"
    shutil.copytree(pristine[0], src)
    before = tree_snapshot(src)
    out = tmp_path / "bn"
    with mock():
        rc = cli.main(["bn-stats", "--workdir", str(src), "--out", str(out), "--batches", str(BATCHES)])
        assert rc == 0, capsys.readouterr().err
        assert f"averaged over {BATCHES} training batches" in capsys.readouterr().out
        assert tree_snapshot(src) == before  # the source run is untouched
        config, _, old = evaluate.restore(src, whole=True)
        _, _, new = evaluate.restore(out, whole=True)
        want = _direct(config, to_host(old), BATCHES)
    old, new = to_host(old), to_host(new)
    assert int(new.step) == int(old.step) == 6
    assert_trees_close(new.params, old.params, rtol=0, atol=0, what="params")  # only the statistics change
    assert_trees_close(new.batch_stats, want, what="batch_stats")
    with pytest.raises(AssertionError):  # they are not the moving averages they replace
        assert_trees_close(old.batch_stats, want)
    meta = json.loads((out / "checkpoints" / "6" / "meta" / "metadata").read_text())
    assert meta["bn_stats"]["batches"] == BATCHES and meta["bn_stats"]["augmentation"] == "training"
    assert json.loads((out / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    # a second time into the same folder is refused in one line, and changes nothing
    snap = tree_snapshot(out)
    assert cli.main(["bn-stats", "--workdir", str(src), "--out", str(out)]) == 2
    assert tree_snapshot(out) == snap


def test_bn_group_sizes_that_cannot_be_formed_are_refused_in_one_line():
    from test_train import tiny_config  # noqa: PLC0415

    c = tiny_config(batch_size=96, bn_group_size=32)
    build.check_bn_groups(c, 1)  # 3 groups on one device
    build.check_bn_groups(c, 3)  # a group per device
    build.check_bn_groups(c, 6)  # a group spans 2 devices
    for size, ndev, words in ((20, 1, "does not divide batch_size 96"), (16, 4, "24 images each")):
        c.bn_group_size = size
        with pytest.raises(BadInput, match=words) as e:
            build.check_bn_groups(c, ndev)
        assert "\n" not in str(e.value)
    c.bn_group_size, c.bn_sync = 32, True
    with pytest.raises(BadInput, match="bn_sync=True"):
        build.bn_groups(c)
    # the layer's own check (what a model used outside the train loop meets)
    with pytest.raises(ValueError, match="does not divide the 24 images"):
        fastops.bn_groups(24, 16, None)
    assert fastops.bn_groups(24, 8, "data") == (3, None, None)
    assert fastops.bn_groups(24, None, "data") == (1, "data", None)
