"""The paper's shortcut options A, B, C (Sec. 3.3), plain nets, and zero-initialised residual blocks.

Every test name contains "shortcut" so that ``pytest -k shortcut`` selects this file.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from resflax.models import BasicBlock, BottleneckBlock, Shortcut, get_model
from resflax.models.blocks import option_a

# The "rbg" generator compiles several times faster on CPU than the default threefry; values don't matter here.
KEY = jax.random.key(0, impl="rbg")
CONV = functools.partial(nn.Conv, use_bias=False)
NORM = nn.BatchNorm


def _record(model, variables, x):
    """Eval-mode output of every submodule, keyed by its path (``stage1/block0/shortcut``).

    Recorded by method interception rather than the ``intermediates`` collection, so these tests depend
    only on the modules themselves.
    """
    outputs = {}

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__":
            outputs["/".join(context.module.scope.path)] = out
        return out

    def run(variables, x):
        with nn.intercept_methods(interceptor):
            model.apply(variables, x, train=False)
        return outputs

    return jax.jit(run)(variables, x)


def _filled_variables(model, x, seed=0):
    """Random-valued ``params``/``batch_stats`` of the model's shapes, drawn with NumPy.

    Compiling the model's own (threefry) initialisers costs seconds per network on CPU; these tests only
    need some non-trivial weights and statistics.
    """
    abstract = jax.eval_shape(lambda v: model.init(KEY, v, train=False), x)
    rng = np.random.default_rng(seed)
    draw = {
        "kernel": lambda s: rng.standard_normal(s) * np.sqrt(2.0 / np.prod(s[:-1])),
        "scale": lambda s: rng.uniform(0.5, 1.5, s),
        "bias": lambda s: rng.normal(0.0, 0.1, s),
        "mean": lambda s: rng.normal(0.0, 0.1, s),
        "var": lambda s: rng.uniform(0.5, 1.5, s),
    }
    flat = traverse_util.flatten_dict(dict(abstract))
    filled = {k: jnp.asarray(draw[k[-1]](v.shape), v.dtype) for k, v in flat.items()}
    return traverse_util.unflatten_dict(filled)


# Jitted init/apply: op-by-op dispatch is several times slower than compiling the small graphs here, and
# the compiled function is cached per module so that applying it to other variables or inputs is free.
_JITTED: dict = {}


def _init(module, x):
    return jax.jit(lambda v: module.init(KEY, v, train=False))(x)


def _apply(module, variables, x, train=False):
    key = (id(module), train)
    if key not in _JITTED:
        if train:
            fn = jax.jit(lambda var, v: module.apply(var, v, train=True, mutable=["batch_stats"])[0])
        else:
            fn = jax.jit(lambda var, v: module.apply(var, v, train=False))
        _JITTED[key] = (module, fn)  # holding the module keeps its id from being reused
    return _JITTED[key][1](variables, x)


def _positive(shape, seed=1):
    """Strictly positive input, so that a zero in the output can only come from padding."""
    return jax.random.uniform(jax.random.PRNGKey(seed), shape, minval=0.5, maxval=2.0)


def _shortcut(option, out_channels, strides, layout="append"):
    return Shortcut(option=option, out_channels=out_channels, strides=strides, conv=CONV, norm=NORM, pad_layout=layout)


def _abstract_variables(model, hw):
    x = jax.ShapeDtypeStruct((1, *hw, 3), jnp.float32)
    return jax.eval_shape(lambda v: model.init(KEY, v, train=False), x)


def _flat(tree):
    return traverse_util.flatten_dict(dict(tree), sep="/")


def _projected_blocks(model, hw):
    """``stage/block`` of every block that owns a ``shortcut`` parameter subtree."""
    params = _abstract_variables(model, hw)["params"]
    return {"/".join(p.split("/")[:2]) for p in _flat(params) if p.split("/")[2:3] == ["shortcut"]}


def _n_params(model, hw):
    return sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(_abstract_variables(model, hw)["params"]))


# ---------------------------------------------------------------------------------------------- option A


@pytest.mark.parametrize("strides", [1, 2])
def test_shortcut_option_a_has_no_parameters_or_state(strides):
    x = _positive((2, 8, 8, 16))
    variables = _shortcut("A", 32, strides).init(KEY, x, train=True)  # train: no batch_stats either
    assert jax.tree_util.tree_leaves(variables) == []


@pytest.mark.parametrize(
    "layout, in_c, out_c, before",
    [
        ("append", 16, 32, 0),  # fb.resnet.torch: zeros after the real channels
        ("split", 16, 32, 8),  # akamaster: a quarter of the output channels on each side
        ("append", 64, 256, 0),  # bottleneck stage1/block0: stride 1, 4x channels
        ("split", 5, 12, 3),  # odd number of zero channels: the extra one goes after
    ],
)
def test_shortcut_option_a_pads_exact_zeros_and_keeps_subsampled_input(layout, in_c, out_c, before):
    x = _positive((2, 7, 6, in_c))
    for strides in (1, 2):
        y = np.asarray(_apply(_shortcut("A", out_c, strides, layout), {}, x))
        sub = np.asarray(x)[:, ::strides, ::strides, :]
        assert y.shape == (2, sub.shape[1], sub.shape[2], out_c)
        np.testing.assert_array_equal(y[..., before : before + in_c], sub)
        zeros = np.concatenate([y[..., :before], y[..., before + in_c :]], axis=-1)
        assert zeros.shape[-1] == out_c - in_c
        assert np.all(zeros == 0.0), "option A's padded channels must be exactly zero"


def test_shortcut_option_a_subsamples_the_pixels_a_stride_2_conv_centres_on():
    # Pixel (i, j) of the output must be input pixel (2i, 2j): the centre of a 3x3/2 conv with padding 1.
    x = jnp.arange(1 * 6 * 6 * 1, dtype=jnp.float32).reshape(1, 6, 6, 1) + 1.0
    y = option_a(x, 2, 2, "append")
    np.testing.assert_array_equal(y[0, :, :, 0], np.asarray(x)[0, 0::2, 0::2, 0])
    np.testing.assert_array_equal(y[0, :, :, 1], np.zeros((3, 3)))


def test_shortcut_option_a_layouts_differ_and_bad_input_raises():
    x = _positive((1, 4, 4, 8))
    assert not np.array_equal(option_a(x, 16, 2, "append"), option_a(x, 16, 2, "split"))
    with pytest.raises(ValueError, match="layout"):
        option_a(x, 16, 2, "middle")
    with pytest.raises(ValueError, match="reduce"):
        option_a(x, 4, 1)
    with pytest.raises(ValueError, match="shortcut option"):
        _shortcut("D", 8, 1).init(KEY, x, train=False)


# ---------------------------------------------------------------------------------------------- identity


@pytest.mark.parametrize("option", ["A", "B"])
def test_shortcut_is_parameter_free_identity_where_shapes_match(option):
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 5, 5, 16))
    module = _shortcut(option, 16, 1)
    variables = _init(module, x)
    assert jax.tree_util.tree_leaves(variables) == []
    for train in (False, True):
        np.testing.assert_array_equal(_apply(module, variables, x, train), x)


def test_shortcut_option_c_projects_even_where_shapes_match():
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 5, 5, 16))
    module = _shortcut("C", 16, 1)
    variables = _init(module, x)
    flat = _flat(variables["params"])
    assert {k: v.shape for k, v in flat.items()} == {"conv/kernel": (1, 1, 16, 16), "bn/scale": (16,), "bn/bias": (16,)}
    assert not np.allclose(_apply(module, variables, x), x)


@pytest.mark.parametrize("option", ["B", "C"])
def test_shortcut_projection_is_strided_1x1_conv_plus_bn(option):
    x = jax.random.normal(jax.random.PRNGKey(4), (2, 7, 7, 16))
    module = _shortcut(option, 32, 2)
    variables = _init(module, x)
    kernel = variables["params"]["conv"]["kernel"]
    assert kernel.shape == (1, 1, 16, 32)
    assert set(variables["batch_stats"]["bn"]) == {"mean", "var"}
    # Fresh running stats (mean 0, var 1), scale 1, bias 0: BN divides by sqrt(1 + eps).
    expected = jnp.einsum("nhwc,cd->nhwd", x[:, ::2, ::2, :], kernel[0, 0]) / jnp.sqrt(1.0 + 1e-5)
    np.testing.assert_allclose(_apply(module, variables, x), expected, rtol=1e-4, atol=1e-5)


def test_shortcut_identity_inside_network_where_shapes_match():
    """In resnet14 the shortcut of every non-first block returns its block's input unchanged."""
    model = get_model("resnet14")
    x = jax.random.normal(jax.random.PRNGKey(5), (2, 8, 8, 3))
    variables = _filled_variables(model, x)
    out = _record(model, variables, x)
    for stage in ("stage1", "stage2", "stage3"):
        for j in (1,):
            np.testing.assert_array_equal(out[f"{stage}/block{j}/shortcut"], out[f"{stage}/block{j - 1}"])
    # Where shapes change (option A), it is the subsampled, zero-padded input instead.
    np.testing.assert_array_equal(out["stage2/block0/shortcut"], option_a(out["stage1"], 32, 2))


# ---------------------------------------------------------------------------------------------- B and C in networks


@pytest.mark.parametrize(
    "name, overrides, hw, expected",
    [
        ("resnet34", {}, (224, 224), {"stage2/block0", "stage3/block0", "stage4/block0"}),
        ("resnet18", {"shortcut": "B"}, (224, 224), {"stage2/block0", "stage3/block0", "stage4/block0"}),
        # Bottleneck: stage1/block0 changes 64 -> 256 channels at stride 1, so it projects too.
        ("resnet50", {}, (224, 224), {"stage1/block0", "stage2/block0", "stage3/block0", "stage4/block0"}),
        ("resnet20", {"shortcut": "B"}, (32, 32), {"stage2/block0", "stage3/block0"}),
        ("resnet56", {"shortcut": "B"}, (32, 32), {"stage2/block0", "stage3/block0"}),
    ],
)
def test_shortcut_b_projects_only_where_shapes_change(name, overrides, hw, expected):
    model = get_model(name, **overrides)
    assert model.shortcut == "B"
    assert _projected_blocks(model, hw) == expected


def test_shortcut_b_projection_shapes_cifar():
    variables = _abstract_variables(get_model("resnet20", shortcut="B"), (32, 32))
    flat = {k: v.shape for k, v in _flat(variables["params"]).items() if "/shortcut/" in k}
    assert flat == {
        "stage2/block0/shortcut/conv/kernel": (1, 1, 16, 32),
        "stage2/block0/shortcut/bn/scale": (32,),
        "stage2/block0/shortcut/bn/bias": (32,),
        "stage3/block0/shortcut/conv/kernel": (1, 1, 32, 64),
        "stage3/block0/shortcut/bn/scale": (64,),
        "stage3/block0/shortcut/bn/bias": (64,),
    }


@pytest.mark.parametrize(
    "name, hw, blocks_per_stage",
    [("resnet20", (32, 32), (3, 3, 3)), ("resnet18", (224, 224), (2, 2, 2, 2)), ("resnet50", (224, 224), (3, 4, 6, 3))],
)
def test_shortcut_c_projects_every_block(name, hw, blocks_per_stage):
    expected = {f"stage{i + 1}/block{j}" for i, n in enumerate(blocks_per_stage) for j in range(n)}
    assert _projected_blocks(get_model(name, shortcut="C"), hw) == expected


@pytest.mark.parametrize("name, hw", [("resnet20", (32, 32)), ("resnet18", (224, 224))])
def test_shortcut_option_a_network_has_no_shortcut_parameters(name, hw):
    assert _projected_blocks(get_model(name, shortcut="A"), hw) == set()


# ---------------------------------------------------------------------------------------------- plain nets


@pytest.mark.parametrize(
    "name, overrides, hw",
    [
        ("plain20", {}, (32, 32)),
        ("plain20", {"shortcut": "C"}, (32, 32)),  # the option is ignored when residual=False
        ("plain18", {}, (224, 224)),
        ("plain34", {}, (224, 224)),
    ],
)
def test_shortcut_absent_from_plain_nets(name, overrides, hw):
    model = get_model(name, **overrides)
    assert model.residual is False
    assert _projected_blocks(model, hw) == set()
    # Option A has no parameters, so also check that no Shortcut module is ever called ...
    x = jax.ShapeDtypeStruct((1, *hw, 3), jnp.float32)

    def called_modules(net):
        paths = []
        jax.eval_shape(lambda v: paths.extend(_record(net, net.init(KEY, v, train=False), v)), x)
        return paths

    paths = called_modules(model)
    assert "stage1/block0/bn2" in paths
    assert not [p for p in paths if "shortcut" in p]
    # ... while the residual twin of the same net does call its shortcuts.
    assert [p for p in called_modules(model.clone(residual=True)) if "shortcut" in p]


def test_shortcut_plain_block_output_is_relu_of_last_bn():
    """Without a shortcut a block outputs relu(bn2(...)): nothing is added."""
    model = get_model("plain14")
    x = jax.random.normal(jax.random.PRNGKey(6), (2, 8, 8, 3))
    variables = _filled_variables(model, x)
    out = _record(model, variables, x)
    for block in ("stage1/block1", "stage2/block0", "stage3/block1"):
        np.testing.assert_array_equal(out[block], jax.nn.relu(out[f"{block}/bn2"]))


@pytest.mark.parametrize(
    "plain, hw", [("plain20", (32, 32)), ("plain56", (32, 32)), ("plain18", (224, 224)), ("plain34", (224, 224))]
)
def test_shortcut_plain_and_residual_counts_equal_under_option_a(plain, hw):
    residual = "resnet" + plain[len("plain") :]
    plain_vars = _abstract_variables(get_model(plain), hw)
    res_vars = _abstract_variables(get_model(residual, shortcut="A"), hw)
    assert _n_params(get_model(plain), hw) == _n_params(get_model(residual, shortcut="A"), hw)
    # Not just equal in number: the same tree, path for path.
    shapes = lambda t: {k: v.shape for k, v in _flat(t).items()}  # noqa: E731
    assert shapes(plain_vars["params"]) == shapes(res_vars["params"])


def test_shortcut_b_adds_exactly_the_projection_parameters():
    # resnet18 (option B) - plain18 = three 1x1 projections + their BN: 64->128, 128->256, 256->512.
    projections = sum(c * 2 * c + 2 * (2 * c) for c in (64, 128, 256))
    assert projections == 173_824
    assert _n_params(get_model("resnet18"), (224, 224)) - _n_params(get_model("plain18"), (224, 224)) == projections


# ---------------------------------------------------------------------------------------------- zero-init last BN


def _block_output(block, x, train):
    return _apply(block, _init(block, x), x, train)


def _with_last_bn_scale_one(variables, bn):
    """The same variables as an ordinary (not zero-initialised) block: last BN scale 1."""
    flat = traverse_util.flatten_dict(variables)
    flat[("params", bn, "scale")] = jnp.ones_like(flat[("params", bn, "scale")])
    return traverse_util.unflatten_dict(flat)


def test_shortcut_zero_init_basic_block_is_identity_on_nonnegative_input():
    # Last BN: scale 0, bias 0. In eval mode (mean 0, var 1) and in train mode (batch stats) its output is
    # 0 * normalised + 0 = 0, so y = relu(0 + x) = x for x >= 0.
    x = jnp.abs(jax.random.normal(jax.random.PRNGKey(7), (4, 6, 6, 16)))
    xn = jax.random.normal(jax.random.PRNGKey(8), (4, 6, 6, 16))
    block = BasicBlock(filters=16, strides=1, conv=CONV, norm=NORM, shortcut="A", zero_init_last_bn=True)
    variables = _init(block, x)
    np.testing.assert_array_equal(variables["params"]["bn2"]["scale"], np.zeros(16))
    np.testing.assert_array_equal(variables["params"]["bn1"]["scale"], np.ones(16))
    ordinary = _with_last_bn_scale_one(variables, "bn2")
    for train in (False, True):
        np.testing.assert_array_equal(_apply(block, variables, x, train), x)
        # On inputs with negative entries it is relu, not the identity.
        y = _apply(block, variables, xn, train)
        np.testing.assert_array_equal(y, jax.nn.relu(xn))
        assert not np.array_equal(y, xn)
        # Without zero-init the residual branch contributes and the block is not the identity.
        assert not np.allclose(_apply(block, ordinary, x, train), x, atol=1e-3)


def test_shortcut_zero_init_bottleneck_block_is_identity_on_nonnegative_input():
    x = jnp.abs(jax.random.normal(jax.random.PRNGKey(9), (4, 6, 6, 32)))
    block = BottleneckBlock(filters=8, strides=1, conv=CONV, norm=NORM, zero_init_last_bn=True)
    variables = _init(block, x)
    assert "shortcut" not in variables["params"]  # option B, shapes match: identity
    np.testing.assert_array_equal(variables["params"]["bn3"]["scale"], np.zeros(32))
    np.testing.assert_array_equal(variables["params"]["bn2"]["scale"], np.ones(8))
    ordinary = _with_last_bn_scale_one(variables, "bn3")
    for train in (False, True):
        np.testing.assert_array_equal(_apply(block, variables, x, train), x)
        assert not np.allclose(_apply(block, ordinary, x, train), x, atol=1e-3)


def test_shortcut_zero_init_network_reduces_to_its_shortcuts():
    """With every last BN scale zero, resnet8 (option A, eval mode) passes relu(stem) through its shortcuts."""
    model = get_model("resnet8", zero_init_last_bn=True)
    x = jax.random.normal(jax.random.PRNGKey(10), (2, 8, 8, 3))
    variables = _init(model, x)
    out = _record(model, variables, x)
    features = jax.nn.relu(out["stem_bn"])
    assert float(jnp.max(features)) > 0
    np.testing.assert_array_equal(out["stage1"], features)
    np.testing.assert_array_equal(out["stage2"], option_a(features, 32, 2))
    np.testing.assert_array_equal(out["stage3"], option_a(option_a(features, 32, 2), 64, 2))
