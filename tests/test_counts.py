"""Parameter and multiply-add counts against the paper, and golden parameter trees (path -> shape).

Regenerate the golden files after an intended change of the parameter tree with:

    REGEN_GOLDEN=1 .venv/bin/python -m pytest tests/test_counts.py -k golden
"""

from __future__ import annotations

import functools
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import pytest
from flax import traverse_util

from resflax.analysis.counts import count, input_shape, summary
from resflax.models import available_models, get_model

GOLDEN_DIR = pathlib.Path(__file__).parent / "golden"
REGEN_COMMAND = "REGEN_GOLDEN=1 .venv/bin/python -m pytest tests/test_counts.py -k golden"

# Exact parameter counts (convs without bias, BN scale + bias, FC with bias; running statistics excluded).
PARAMS = {
    "resnet20": 269_722,
    "resnet32": 464_154,
    "resnet44": 658_586,
    "resnet56": 853_018,
    "resnet110": 1_727_962,
    "resnet1202": 19_421_274,
    # Option A is parameter-free, so the CIFAR plain nets count exactly the same.
    "plain20": 269_722,
    "plain32": 464_154,
    "plain44": 658_586,
    "plain56": 853_018,
    "plain110": 1_727_962,
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    # ResNet-18/34 (option B) minus their three projections 64->128, 128->256, 256->512 (1x1 conv + BN).
    "plain18": 11_689_512 - 173_824,
    "plain34": 21_797_672 - 173_824,
    # torchvision's vgg16 / vgg19 (1000 classes)
    "vgg16": 138_357_544,
    "vgg19": 143_667_240,
}

# Table 1, multiply-adds per 224x224 image.
MULT_ADDS = {
    "resnet18": 1.8e9,
    "resnet34": 3.6e9,
    "resnet50": 3.8e9,
    "resnet101": 7.6e9,
    "resnet152": 11.3e9,
    "plain18": 1.8e9,
    "plain34": 3.6e9,
}


@functools.cache
def _summary(name: str) -> dict:
    return summary(name)


def _cifar_params(n: int) -> int:
    """Option-A CIFAR net with n blocks per stage, summed by hand from Sec. 4.2.

    stem 3x3x3x16 + BN; stage1 2n convs 3x3x16x16 + BN; stage2 3x3x16x32 then 2n-1 3x3x32x32, + BN;
    stage3 3x3x32x64 then 2n-1 3x3x64x64, + BN; FC 64x10 + 10.
    """
    stem = 27 * 16 + 32
    stage1 = 2 * n * (144 * 16 + 32)
    stage2 = (144 * 32 + 64) + (2 * n - 1) * (288 * 32 + 64)
    stage3 = (288 * 64 + 128) + (2 * n - 1) * (576 * 64 + 128)
    return stem + stage1 + stage2 + stage3 + 64 * 10 + 10


def _cifar_mult_adds(n: int) -> int:
    """Multiply-adds of the same net on a 32x32 image: every output element of a conv costs k*k*C_in."""
    stem = 32 * 32 * 16 * 27
    stage1 = 2 * n * 32 * 32 * 16 * 144
    stage2 = 16 * 16 * 32 * 144 + (2 * n - 1) * 16 * 16 * 32 * 288
    stage3 = 8 * 8 * 64 * 288 + (2 * n - 1) * 8 * 8 * 64 * 576
    return stem + stage1 + stage2 + stage3 + 64 * 10


# ---------------------------------------------------------------------------------------------- counts


def test_every_named_model_has_a_pinned_count():
    assert sorted(PARAMS) == sorted(available_models())


@pytest.mark.parametrize("name", sorted(PARAMS, key=lambda n: PARAMS[n]))
def test_exact_parameter_count(name):
    s = _summary(name)
    assert s["model"] == name
    assert s["params"] == PARAMS[name]
    if s["paper_params"] is not None:
        assert s["paper_params"] == PARAMS[name]


def test_hand_derived_cifar_counts_match_the_paper():
    # The formulas used below are themselves pinned to the paper's numbers.
    assert [_cifar_params(n) for n in (3, 5, 7, 9, 18, 200)] == [
        PARAMS[f"resnet{6 * n + 2}"] for n in (3, 5, 7, 9, 18, 200)
    ]


@pytest.mark.parametrize(
    "name, n",
    [("resnet8", 1), ("plain14", 2), ("resnet20", 3), ("resnet56", 9), ("cifar_resnet50", 8), ("cifar_plain152", 25)],
)
def test_cifar_counts_for_any_depth(name, n):
    c = count(get_model(name), (32, 32, 3))
    assert c == {"params": _cifar_params(n), "mult_adds": _cifar_mult_adds(n)}


@pytest.mark.parametrize("name", sorted(MULT_ADDS))
def test_mult_adds_within_3_percent_of_table1(name):
    s = _summary(name)
    assert s["mult_adds"] == pytest.approx(MULT_ADDS[name], rel=0.03)
    if name.startswith("resnet"):
        assert s["paper_mult_adds"] == MULT_ADDS[name]


def test_projection_shortcuts_cost_exactly_their_1x1_convs():
    # resnet18 (B) - plain18: 1x1 projections at 28x28x128 (from 64), 14x14x256 (from 128), 7x7x512 (from 256).
    projections = 28 * 28 * 128 * 64 + 14 * 14 * 256 * 128 + 7 * 7 * 512 * 256
    assert _summary("resnet18")["mult_adds"] - _summary("plain18")["mult_adds"] == projections
    assert _summary("resnet34")["mult_adds"] - _summary("plain34")["mult_adds"] == projections


@pytest.mark.parametrize(
    "option, extra_params, extra_mult_adds",
    [
        ("A", 0, 0),
        # B: 1x1 16->32 + BN(32) and 32->64 + BN(64), at 16x16 and 8x8 outputs.
        ("B", (16 * 32 + 64) + (32 * 64 + 128), 16 * 16 * 32 * 16 + 8 * 8 * 64 * 32),
        # C: a 1x1 conv + BN in every one of the 9 blocks.
        (
            "C",
            3 * (16 * 16 + 32) + (16 * 32 + 64) + 2 * (32 * 32 + 64) + (32 * 64 + 128) + 2 * (64 * 64 + 128),
            3 * 32 * 32 * 16 * 16 + 16 * 16 * 32 * (16 + 2 * 32) + 8 * 8 * 64 * (32 + 2 * 64),
        ),
    ],
)
def test_counts_of_resnet20_per_option(option, extra_params, extra_mult_adds):
    s = summary("resnet20", shortcut=option)
    assert s["params"] == 269_722 + extra_params
    assert s["mult_adds"] == _cifar_mult_adds(3) + extra_mult_adds
    assert s["paper_params"] is None  # an overridden model is not the paper's


def test_v15_costs_more_multiply_adds_for_the_same_parameters():
    v1, v15 = _summary("resnet50"), summary("resnet50", stride_on_3x3=True)
    assert v15["params"] == v1["params"]
    # Moving the stride from the first 1x1 to the 3x3 leaves the 3x3's output (and cost) at the lower
    # resolution but runs that 1x1 (2C -> C) on the full-resolution input: 4x its v1 cost, in the first block
    # of stages 2, 3, 4 (C = 128, 256, 512 at 28x28, 14x14, 7x7 outputs).
    v1_first_1x1 = [h * h * c * 2 * c for h, c in ((28, 128), (14, 256), (7, 512))]
    assert v15["mult_adds"] - v1["mult_adds"] == 3 * sum(v1_first_1x1)


def test_summary_keys_and_input_shapes():
    s = _summary("resnet110")
    assert {"model", "params", "mult_adds", "paper_params", "paper_mult_adds", "paper_test_error"} <= set(s)
    assert s["paper_test_error"] == 6.43
    assert json.loads(json.dumps(s)) == s
    assert tuple(input_shape("resnet110")) == (32, 32, 3)
    assert tuple(input_shape("resnet152")) == (224, 224, 3)
    assert tuple(input_shape("cifar_resnet152")) == (32, 32, 3)


# ---------------------------------------------------------------------------------------------- golden trees

GOLDEN = {
    "resnet20": ("resnet20", {}),
    "plain20": ("plain20", {}),
    "resnet18": ("resnet18", {}),
    "resnet50_shortcutB": ("resnet50", {"shortcut": "B"}),
    "resnet20_shortcutC": ("resnet20", {"shortcut": "C"}),
}


def _tree(name: str, overrides: dict) -> dict[str, list[int]]:
    model = get_model(name, **overrides)
    x = jax.ShapeDtypeStruct((1, *input_shape(name)), jnp.float32)
    variables = jax.eval_shape(lambda v: model.init(jax.random.PRNGKey(0), v, train=False), x)
    flat = traverse_util.flatten_dict(dict(variables), sep="/")
    return {path: list(leaf.shape) for path, leaf in sorted(flat.items())}


@pytest.mark.parametrize("golden", sorted(GOLDEN))
def test_golden_parameter_tree(golden):
    name, overrides = GOLDEN[golden]
    tree = _tree(name, overrides)
    path = GOLDEN_DIR / f"{golden}.json"
    if os.environ.get("REGEN_GOLDEN"):
        GOLDEN_DIR.mkdir(exist_ok=True)
        path.write_text(json.dumps(tree, indent=1) + "\n")
        pytest.skip(f"regenerated {path}")
    assert path.exists(), f"missing {path}; create it with: {REGEN_COMMAND}"
    expected = json.loads(path.read_text())
    missing = sorted(set(expected) - set(tree))
    extra = sorted(set(tree) - set(expected))
    changed = sorted(p for p in set(tree) & set(expected) if tree[p] != expected[p])
    assert tree == expected, (
        f"parameter tree of {golden} differs from {path.name}: only in the file {missing[:5]} ({len(missing)}), "
        f"only in the model {extra[:5]} ({len(extra)}), reshaped {changed[:5]} ({len(changed)}). Renaming or reshaping "
        f"parameters breaks saved checkpoints and weight import; if intended, regenerate with: {REGEN_COMMAND}"
    )
    # The golden file is a real parameter tree, not an empty one.
    n_params = sum(int(jnp.prod(jnp.array(s))) for p, s in expected.items() if p.startswith("params/"))
    assert n_params == summary(name, **overrides)["params"]


def test_vgg_counts_match_torchvision_and_the_paper():
    for name in ("vgg16", "vgg19"):
        s = summary(name)
        assert s["params"] == s["paper_params"]  # torchvision's vgg16 / vgg19, exactly
        assert abs(s["mult_adds"] - s["paper_mult_adds"]) / s["paper_mult_adds"] < 0.03


def test_vgg_adaptive_pool_is_torchvisions():
    import numpy as np  # noqa: PLC0415

    from resflax.models.vgg import _adaptive_avg_pool  # noqa: PLC0415

    rng = np.random.default_rng(0)
    for h, w in [(9, 11), (1, 1), (7, 7), (14, 3)]:
        x = rng.normal(size=(2, h, w, 3)).astype(np.float32)
        want = np.zeros((2, 7, 7, 3), np.float32)
        for i in range(7):  # PyTorch's definition: start floor(i*H/7), end ceil((i+1)*H/7)
            for j in range(7):
                r0, r1 = (i * h) // 7, -(-((i + 1) * h) // 7)
                c0, c1 = (j * w) // 7, -(-((j + 1) * w) // 7)
                want[:, i, j] = x[:, r0:r1, c0:c1].mean(axis=(1, 2))
        np.testing.assert_allclose(np.asarray(_adaptive_avg_pool(x, 7)), want, rtol=1e-6, atol=1e-6)
