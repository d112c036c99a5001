"""Training parity with PyTorch (issue 12, item 1): resflax's jitted train step against a PyTorch reference
network (``benchmarks/torch_reference.py``, option A with resflax's channel layout), step by step for 100 SGD
steps on real CIFAR-10, for ResNet-20, plain-20 and ResNet-110 with the warm-up rule.

Both start from the same weights and see the same batches (``benchmarks/train_parity.py`` draws, on the host,
the batch resflax's step is about to draw: its permutation, crops and flips). The comparison is *single-step*:
before every step PyTorch is re-synchronised to resflax's state (parameters, BN running statistics, momentum
buffers; the schedule's clock and warm-up bookkeeping are PyTorch's own) and takes that step with its own
optimizer (``torch.optim.SGD``), loss (``F.cross_entropy``), BatchNorm (momentum 0.1) and its own
implementation of the paper's schedule and warm-up rule; the result is compared with resflax's next state.
Equal single steps from every state the run visits is what "the same training" means; comparing two free
trajectories instead cannot be done at float32 tolerance: at lr 0.1 two float32 trainings, even PyTorch
against PyTorch with another memory format, drift apart by ~10x per step at first (parameters 5e-6 apart
after one step, 1e-4 after two, 2e-2 after ten; losses 3e-3 apart at step 3) and are as different as two
independent runs after a few dozen steps; ``benchmarks/train_parity.py`` shows that drift and the free-running
curves over 2,000 steps (docs/parity.md).

Tolerances: measured over these runs (2-core CPU, jax 0.10.2, torch 2.13.0; largest value over the 100 steps,
ResNet-20 / plain-20 at batch 32, ResNet-110 at batch 8) and set well above the largest, while staying far
below what a different recipe gives (``test_a_different_recipe_is_caught`` replays resflax's first steps with
one setting changed):

* lr: equal to float32 rounding (resflax computes ``0.1 * 0.1**k`` in float32: 0.0100000007 vs 0.01), and
  the same warm-up flag at every step;
* loss: |d| / loss <= 2.2e-7 / 2.3e-7 / 4.5e-7 (1-4 ulp: the same weights and batch give the same forward
  pass up to summation order); bound 2e-6;
* training error: the same examples misclassified at every step (no near-tie at that level in 100 batches);
* BN running mean/var after the step, worst tensor's max|d| / max|x|: 3.2e-7 / 3.6e-7 / 1.1e-6; bounds 3e-6
  (20 layers), 1e-5 (110). BN momentum 0.2 instead of 0.1 gives 0.1-3; resflax's default *biased* running
  variance gives (1 - 0.9) / (n - 1) with n = batch * 8 * 8 in stage 3: 4.9e-5 at batch 32, 2.0e-4 at 8
  (``test_biased_running_variance_is_caught`` checks the factor itself);
* the step's parameter change and the new momentum buffers, |d| / |x| over all parameters (L2): 3.5e-3 /
  9.1e-3 / 4.7e-3; bounds 2e-2, 3e-2 (110). Not smaller because the gradients of two float32 implementations
  differ by that much (PyTorch float32 vs PyTorch float64 after one step: as far apart as resflax vs either;
  plain nets and deep nets are worse conditioned); momentum 0.8 or lr 0.11 give ~0.1;
* weight decay and momentum as applied: the buffers' difference projected on the weights, resp. on the previous
  buffer, is resflax's coefficient minus PyTorch's (gradient rounding averages out in the projection). Decay:
  1.0e-9 / 1.3e-9 / 4.3e-9, bounds 3e-8, 3e-7 (110); weight decay 0 or 2e-4 gives exactly -/+1e-4. Momentum:
  5.4e-5 / 1.1e-3 / 3.3e-4, bound 5e-3; momentum 0.8 gives 0.1.

Batches are smaller than the paper's 128 to keep the suite's time down (every step runs in both frameworks,
compute-bound on two cores); the paper's batch 128 is what ``benchmarks/train_parity.py`` compares over 2,000
steps (docs/parity.md). The whole file takes ~3.4 min on an idle 2-core machine (ResNet-110 ~1.5 min); all
marked slow.
"""

import dataclasses
import os
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import train_parity as tp  # noqa: E402

DATA = os.environ.get("TFDS_DATA_DIR") or str(ROOT.parent / "shared" / "tfds")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (Path(DATA) / "cifar10").exists(), reason="no CIFAR-10 in TFDS_DATA_DIR or ../shared/tfds"),
]

STEPS = 100
NUM_TRAIN = 2560  # 80 batches of 32 per epoch (100 steps see 2 permutations); decoding all 50k takes ~20 s

TOL = dict(lr=1e-6, loss=2e-6, bn=3e-6, update=2e-2, buffers=2e-2, decay=3e-8, momentum=5e-3)
TOL_DEEP = dict(TOL, bn=1e-5, update=3e-2, buffers=3e-2, decay=3e-7)  # ResNet-110 at batch 8 (see above)

CASES = {
    # lr drops (scaled "32k, 48k") inside the 100 steps: the schedule is exercised
    "resnet20": dict(batch=32, recipe=tp.Recipe(boundaries=(50, 75)), tol=TOL),
    "plain20": dict(batch=32, recipe=tp.Recipe(boundaries=(50, 75)), tol=TOL),
    # the warm-up: lr 0.01 until the smoothed training error (0.9 at first, 5% per step) is below the
    # threshold, then 0.1; the threshold is raised from the paper's 0.8 so that the switch comes inside 100
    # steps; a small batch keeps ResNet-110 affordable on two cores; the lr drop at 90 follows the switch back
    # to 0.1. At batch 8 the smoothed error stays near chance (0.87-0.93) for 100 steps, so where it first
    # crosses a threshold depends on the machine's float rounding: 0.865 was crossed after step 52 on an
    # earlier machine and never on a Sapphire Rapids machine, where 0.888 is crossed at step 19 (0.8867; the
    # lowest value before it 0.8916 at step 10: measured with the lr kept at 0.01); on an AMD EPYC (Zen 4)
    # machine 0.888 is crossed at step 5. So the test asks only that both phases are there (see below).
    "resnet110": dict(batch=8, recipe=tp.Recipe(warmup=True, warmup_until_error=0.888, boundaries=(90,)),
                      tol=TOL_DEEP),
}


@pytest.fixture(scope="module")
def data():
    return tp.load_train(DATA, NUM_TRAIN)


def violations(records: list[dict], tol: dict = TOL) -> list[str]:
    """Every step where PyTorch's single step differs from resflax's by more than ``tol``."""
    bad = []
    for r in records:
        t = r["step"]
        if abs(r["forced_lr"] - r["lr_resflax"]) > tol["lr"] * r["forced_lr"]:
            bad.append(f"step {t}: lr {r['lr_resflax']} vs {r['forced_lr']}")
        if r["forced_warmup_active"] != r["warmup_active_resflax"]:
            bad.append(f"step {t}: warm-up {r['warmup_active_resflax']} vs {r['forced_warmup_active']}")
        if abs(r["forced_loss"] - r["loss_resflax"]) > tol["loss"] * r["forced_loss"]:
            bad.append(f"step {t}: loss {r['loss_resflax']} vs {r['forced_loss']}")
        if r["forced_error"] != r["error_resflax"]:
            bad.append(f"step {t}: error {r['error_resflax']} vs {r['forced_error']}")
        for k, bound in (("bn_mean", "bn"), ("bn_var", "bn"), ("update", "update"), ("buffers", "buffers"),
                         ("decay", "decay"), ("momentum", "momentum")):
            if abs(r[f"forced_{k}"]) > tol[bound]:
                bad.append(f"step {t}: {k} differs by {r[f'forced_{k}']:.3g} (bound {tol[bound]:g})")
    return bad


# In a pytest-xdist worker another worker shares the cores: PyTorch's spinning OpenMP threads then slow its
# steps several times over (ResNet-110: 85 s alone, 360 s beside another worker); one thread avoids that.
THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else None


def _run(name, data, keep=0):
    case = CASES[name]
    return tp.run(name, STEPS, case["batch"], case["recipe"], *data, free=False, forced_every=1, keep=keep,
                  threads=THREADS)


@pytest.fixture(scope="module")
def resnet20(data):
    return _run("resnet20", data, keep=3)


def _assert_parity(res, name):
    recipe = CASES[name]["recipe"]
    bad = violations(res.records, CASES[name]["tol"])
    assert not bad, f"{len(bad)} differences, first: {bad[:5]}"
    lrs = [r["forced_lr"] for r in res.records]
    if not recipe.warmup:  # the schedule was exercised: 0.1, then its two drops
        assert [lrs[0], lrs[recipe.boundaries[0]], lrs[-1]] == pytest.approx([0.1, 0.01, 0.001])
    print(name, tp.summary(res.records), res.switch_step)


def test_resnet20_step_by_step(resnet20):
    _assert_parity(resnet20, "resnet20")


def test_plain20_step_by_step(data):
    _assert_parity(_run("plain20", data), "plain20")


def test_resnet110_warmup_ends_at_the_same_step(data):
    res = _run("resnet110", data)
    _assert_parity(res, "resnet110")
    switch = res.switch_step
    assert switch["resflax"] == switch["forced"], switch
    # at least one warm-up step at lr 0.01 and ten at 0.1 compared, wherever this machine's rounding puts the switch
    assert 0 < switch["resflax"] < STEPS - 10, f"the warm-up should end inside the window: {switch}"
    lrs = [r["lr_resflax"] for r in res.records]
    s = switch["resflax"]
    assert set(np.float32(lrs[:s])) == {np.float32(0.01)} and set(np.float32(lrs[s:90])) == {np.float32(0.1)}


@pytest.mark.parametrize("change, caught", [
    (dict(), None),  # the replay itself passes
    (dict(momentum=0.8), "momentum differs"),
    (dict(weight_decay=0.0), "decay differs"),
    (dict(weight_decay=2e-4), "decay differs"),
    (dict(bn_momentum=0.2), "bn_mean differs"),
    (dict(base_lr=0.11), "update differs"),
    (dict(boundaries=(2, 75)), ": lr "),  # a schedule that drops earlier
])
def test_a_different_recipe_is_caught(resnet20, change, caught):
    """Negative controls: PyTorch replays resflax's first 3 steps with one setting changed; the bounds above
    flag it (momentum from the second step on, when the buffer is no longer 0)."""
    recipe = dataclasses.replace(CASES["resnet20"]["recipe"], **change)
    bad = violations(tp.replay_forced("resnet20", resnet20, recipe))
    if caught is None:
        assert not bad, bad
    else:
        assert any(caught in b for b in bad), bad


def test_biased_running_variance_is_caught(data):
    """resflax's default BN (biased batch variance in the running average, as ``nn.BatchNorm``) against
    PyTorch's unbiased one: one train-mode forward pass of ResNet-20 on a batch of 128 from the same weights,
    with BN momentum 1 (PyTorch; Flax's 0), so that the running statistics are the batch's. With
    ``bn_unbiased_var=True`` they match to float rounding; the default is off by n / (n - 1), n = 128 * H * W:
    7.6e-6 relative in stage 1 (32x32) to 1.2e-4 in stage 3 (8x8), which the BN bound catches."""
    import jax  # noqa: PLC0415

    from resflax.data import augment  # noqa: PLC0415
    from resflax.models import get_model  # noqa: PLC0415

    images, _, mean = data
    x = np.asarray(augment.normalize(images[:128], mean))
    diffs = {}
    for unbiased in (True, False):
        model = get_model("resnet20", bn_unbiased_var=unbiased, bn_momentum=0.0)
        variables = model.init(jax.random.PRNGKey(0), x[:1], train=False)
        _, new = jax.jit(lambda v, x, m=model: m.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)
        ours = tp.to_reference({"params": variables["params"], "batch_stats": new["batch_stats"]}, model)
        net = tp.Torch("resnet20", tp.Recipe(bn_momentum=1.0), tp.to_reference(variables, model))
        with torch.no_grad():
            net.net(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
        diffs[unbiased] = tp.compare(ours, net.state_dict())
    print(diffs)
    assert diffs[True]["bn_mean"] < TOL["bn"] and diffs[True]["bn_var"] < TOL["bn"], diffs
    assert diffs[False]["bn_mean"] < TOL["bn"], diffs
    assert diffs[False]["bn_var"] == pytest.approx(1 / (128 * 8 * 8 - 1), rel=0.05), diffs
