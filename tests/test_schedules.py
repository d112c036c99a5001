"""The paper's learning-rate schedule at every boundary, the ResNet-110 warm-up, and the config's defaults."""

import importlib.util
from pathlib import Path

import jax
import pytest
from synthetic import tiny_step

from resflax.models import get_model
from resflax.train import schedules

ROOT = Path(__file__).resolve().parents[1]


def load_experiment(name="cifar10"):
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize(
    "step,lr",
    [(0, 0.1), (1, 0.1), (31_999, 0.1), (32_000, 0.01), (47_999, 0.01), (48_000, 0.001), (63_999, 0.001)],
)
def test_paper_schedule_boundaries(step, lr):
    got = float(schedules.piecewise_lr(step, 0.1, (32_000, 48_000), 0.1))
    assert got == pytest.approx(lr, rel=1e-6)


def test_warmup_overrides_schedule_until_switched():
    s = schedules.Schedule(base_lr=0.1, boundaries=(32_000, 48_000), factor=0.1, warmup_lr=0.01)
    assert float(s.lr(5, True)) == pytest.approx(0.01)
    assert float(s.lr(40_000, True)) == pytest.approx(0.01)
    assert float(s.lr(5, False)) == pytest.approx(0.1)  # back to 0.1, not stuck
    assert float(s.lr(40_000, False)) == pytest.approx(0.01)


def test_scaled_steps():
    assert schedules.scaled_steps(64_000, 1.0) == 64_000
    assert schedules.scaled_steps(32_000, 0.01) == 320
    assert schedules.scaled_steps(10, 0.001) == 1


def test_config_defaults_are_the_papers():
    c = load_experiment().get_config("resnet56")
    assert (c.batch_size, c.base_lr, c.momentum, c.weight_decay) == (128, 0.1, 0.9, 1e-4)
    assert tuple(c.lr_boundaries) == (32_000, 48_000) and c.num_steps == 64_000 and c.lr_factor == 0.1
    assert c.warmup is False
    c110 = load_experiment().get_config("resnet110,seed=3,val_examples=5000")
    assert c110.warmup is True and c110.warmup_lr == 0.01 and c110.warmup_until_error == 0.8
    assert c110.seed == 3 and c110.val_examples == 5000
    assert load_experiment().get_config("resnet1202").warmup is True


def test_config_rejects_unknown_args_and_keys():
    exp = load_experiment()
    with pytest.raises(ValueError, match="unknown config argument"):
        exp.get_config("resnet20,sed=3")
    with pytest.raises(ValueError, match="type int"):
        exp.get_config("resnet20,seed=abc")
    c = exp.get_config("resnet20")
    c.lock()
    with pytest.raises(AttributeError):
        c.num_stepz = 3


def _tiny_step(warmup_until_error):
    step, s, data = tiny_step(get_model("resnet8"), batch_size=8, mean=0.0, warmup=True,
                              warmup_until_error=warmup_until_error)
    return step, s, data


def test_warmup_switches_back_to_base_lr_in_the_step():
    step, s, data = _tiny_step(warmup_until_error=1.01)  # any error is below 101%: switches after step 0
    s, m0 = step(s, *data)
    assert float(m0["lr"]) == pytest.approx(0.01)
    assert not bool(s.warmup_active) and int(s.warmup_switch_step) == 1
    s, m1 = step(s, *data)
    assert float(m1["lr"]) == pytest.approx(0.1)


def test_warmup_stays_while_error_is_high():
    step, s, data = _tiny_step(warmup_until_error=0.0)  # never below 0%: warm-up never ends
    for _ in range(3):
        s, m = step(s, *data)
        assert float(m["lr"]) == pytest.approx(0.01)
    assert bool(s.warmup_active) and int(s.warmup_switch_step) == -1
    assert jax.device_get(s.step) == 3
