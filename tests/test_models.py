"""The model family and its registry: shapes, names, overrides, stride placement, BN modes, intermediates."""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from resflax.models import ResNet, available_models, get_model, model_spec

# The "rbg" generator compiles several times faster on CPU than the default threefry.
KEY = jax.random.key(0, impl="rbg")

CIFAR_MODELS = ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet1202"]
CIFAR_MODELS += ["plain20", "plain32", "plain44", "plain56", "plain110"]
IMAGENET_MODELS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "plain18", "plain34"]


def _hw(name):
    return (224, 224) if model_spec(name)["stem"] == "imagenet" else (32, 32)


def _abstract_variables(model, x_shape):
    x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
    return jax.eval_shape(lambda v: model.init(KEY, v, train=False), x)


def _flat(tree):
    return traverse_util.flatten_dict(dict(tree), sep="/")


def _filled_variables(model, x_shape, seed=0):
    """Random-valued ``params``/``batch_stats`` of the model's shapes, drawn with NumPy (no init compile)."""
    rng = np.random.default_rng(seed)
    draw = {
        "kernel": lambda s: rng.standard_normal(s) * np.sqrt(2.0 / np.prod(s[:-1])),
        "scale": lambda s: rng.uniform(0.5, 1.5, s),
        "bias": lambda s: rng.normal(0.0, 0.1, s),
        "mean": lambda s: rng.normal(0.0, 0.1, s),
        "var": lambda s: rng.uniform(0.5, 1.5, s),
    }
    flat = traverse_util.flatten_dict(dict(_abstract_variables(model, x_shape)))
    return traverse_util.unflatten_dict({k: jnp.asarray(draw[k[-1]](v.shape), v.dtype) for k, v in flat.items()})


def _recorder(model, train=False, mutable=()):
    """A function (variables, x) -> (logits, {module path: output of its __call__}, mutated collections)."""

    def run(variables, x):
        outputs = {}

        def interceptor(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if context.method_name == "__call__":
                outputs["/".join(context.module.scope.path)] = out
            return out

        with nn.intercept_methods(interceptor):
            if mutable:
                y, state = model.apply(variables, x, train=train, mutable=list(mutable))
            else:
                y, state = model.apply(variables, x, train=train), {}
        return y, outputs, state

    return run


def _sown(intermediates):
    """Sown values keyed ``stage1/block0/bn2`` (``stem_bn`` for the stem), whatever suffix the sow name has."""
    out = {}
    for path, value in _flat(intermediates).items():
        *prefix, leaf = path.split("/")
        m = re.search(r"stem_bn|bn\d", leaf)
        assert m, f"unexpected intermediate {path!r}"
        assert isinstance(value, tuple) and len(value) == 1, f"{path!r} sown {len(value)} times"
        out["/".join([*prefix, m.group(0)])] = value[0]
    return out


# ---------------------------------------------------------------------------------------------- registry


def test_available_models_are_the_papers():
    assert sorted(available_models()) == sorted(CIFAR_MODELS + IMAGENET_MODELS + ["vgg16", "vgg19"])


def test_vgg_forward_and_dropout():
    model = get_model("vgg16", num_classes=5)
    x = jnp.ones((2, 32, 32, 3))
    # the structure from tracing init; values from a cheap deterministic fill: drawing VGG-16's 134M initial
    # weights (fc0 alone is 25088 x 4096) takes ~20 s on two cores, and the init itself is torchvision's
    # (tests/test_weights.py imports torchvision's VGG-16 into this model)
    shapes = jax.eval_shape(lambda: model.init(KEY, x, train=False))
    # positive weights scaled by 1/fan-in keep every layer's activations O(1) and alive through the ReLUs
    v = jax.tree_util.tree_map_with_path(
        lambda p, s: ((1.5 + jnp.cos(jnp.arange(s.size, dtype=jnp.float32))).reshape(s.shape)
                      / (s.size // s.shape[-1]) if p[-1].key == "kernel" else jnp.zeros(s.shape)), shapes)
    assert set(v["params"]) == {f"conv{i}" for i in range(13)} | {"fc0", "fc1", "fc2"}
    assert "batch_stats" not in v
    a = model.apply(v, x, train=False)
    assert a.shape == (2, 5) and bool(jnp.all(a == model.apply(v, x, train=False)))
    b1 = model.apply(v, x, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
    b2 = model.apply(v, x, train=True, rngs={"dropout": jax.random.PRNGKey(2)})
    assert not bool(jnp.allclose(b1, b2))  # dropout is on in training only
    assert len(jax.eval_shape(lambda: get_model("vgg19").init(KEY, x))["params"]) == 16 + 3


@pytest.mark.parametrize("name", CIFAR_MODELS + IMAGENET_MODELS)
def test_output_shape_of_every_named_model(name):
    model = get_model(name)
    imagenet = name in IMAGENET_MODELS
    hw = (224, 224) if imagenet else (32, 32)
    x = jax.ShapeDtypeStruct((2, *hw, 3), jnp.float32)
    logits, variables = jax.eval_shape(lambda v: model.init_with_output(KEY, v, train=False), x)
    assert logits.shape == (2, 1000 if imagenet else 10)
    assert logits.dtype == jnp.float32
    assert set(variables) == {"params", "batch_stats"}
    assert len(model.stage_sizes) == (4 if imagenet else 3)


@pytest.mark.parametrize(
    "name",
    [
        "resnet21",
        "resnet7",
        "resnet2",
        "resnet0",
        "foo",
        "imagenet_plain50",
        "imagenet_resnet20",
        "cifar_resnet18",
        "plain",
        "ResNet20",
        "resnet-20",
        "vgg11",
        "",
    ],
)
def test_invalid_name_raises_value_error_listing_models(name):
    with pytest.raises(ValueError) as err:
        get_model(name)
    message = str(err.value)
    assert repr(name) in message
    for available in available_models():
        assert re.search(rf"\b{available}\b", message), f"{available} missing from: {message}"
    assert "6n+2" in message


@pytest.mark.parametrize(
    "name, family, block, sizes, residual",
    [
        ("resnet8", "cifar", "basic", (1, 1, 1), True),  # any 6n+2 depth, not only the paper's
        ("plain1202", "cifar", "basic", (200, 200, 200), False),
        ("plain50", "cifar", "basic", (8, 8, 8), False),  # no ImageNet plain50, so the bare name is CIFAR
        ("cifar_resnet50", "cifar", "basic", (8, 8, 8), True),
        ("cifar_resnet152", "cifar", "basic", (25, 25, 25), True),
        ("resnet50", "imagenet", "bottleneck", (3, 4, 6, 3), True),  # bare 50/152 are the ImageNet nets
        ("imagenet_resnet50", "imagenet", "bottleneck", (3, 4, 6, 3), True),
        ("resnet152", "imagenet", "bottleneck", (3, 8, 36, 3), True),
        ("imagenet_plain34", "imagenet", "basic", (3, 4, 6, 3), False),
        ("resnet101", "imagenet", "bottleneck", (3, 4, 23, 3), True),
    ],
)
def test_model_spec_of_names_and_prefixes(name, family, block, sizes, residual):
    spec = model_spec(name)
    assert spec["stem"] == family
    assert spec["block"] == block
    assert tuple(spec["stage_sizes"]) == sizes
    assert spec["residual"] is residual
    if family == "cifar":
        assert (tuple(spec["widths"]), spec["stem_width"], spec["shortcut"], spec["num_classes"]) == (
            (16, 32, 64),
            16,
            "A",
            10,
        )
    else:
        assert (tuple(spec["widths"]), spec["stem_width"], spec["shortcut"], spec["num_classes"]) == (
            (64, 128, 256, 512),
            64,
            "B",
            1000,
        )


def test_cifar_resnet50_is_three_stages_of_eight_basic_blocks():
    params = _flat(_abstract_variables(get_model("cifar_resnet50"), (1, 32, 32, 3))["params"])
    blocks = {tuple(p.split("/")[:2]) for p in params if p.startswith("stage")}
    assert blocks == {(f"stage{i}", f"block{j}") for i in (1, 2, 3) for j in range(8)}
    assert "stage1/block0/conv3/kernel" not in params
    imagenet = _flat(_abstract_variables(get_model("imagenet_resnet50"), (1, 224, 224, 3))["params"])
    assert imagenet["stage1/block0/conv3/kernel"].shape == (1, 1, 64, 256)


# ---------------------------------------------------------------------------------------------- overrides


def test_overrides_take_effect():
    m = get_model("resnet34", shortcut="C", num_classes=100)
    assert (m.shortcut, m.num_classes) == ("C", 100)
    x = jax.ShapeDtypeStruct((3, 224, 224, 3), jnp.float32)
    logits, variables = jax.eval_shape(lambda v: m.init_with_output(KEY, v, train=False), x)
    assert logits.shape == (3, 100)
    params = _flat(variables["params"])
    assert params["fc/kernel"].shape == (512, 100)
    assert params["stage1/block0/shortcut/conv/kernel"].shape == (1, 1, 64, 64)  # C: even where shapes match
    assert get_model("resnet50", stride_on_3x3=True).stride_on_3x3 is True
    assert get_model("resnet50").stride_on_3x3 is False  # the paper's v1 is the default
    cifar = get_model("resnet20", num_classes=100, shortcut="B")
    params = _flat(_abstract_variables(cifar, (1, 32, 32, 3))["params"])
    assert params["fc/kernel"].shape == (64, 100)
    assert "stage2/block0/shortcut/conv/kernel" in params


def test_overrides_do_not_leak_into_later_models():
    get_model("resnet20", shortcut="C", num_classes=7)
    m = get_model("resnet20")
    assert (m.shortcut, m.num_classes) == ("A", 10)


@pytest.mark.parametrize("override", [{"shortcuts": "B"}, {"depth": 20}, {"stride_on_3X3": True}])
def test_unknown_override_raises(override):
    with pytest.raises(ValueError) as err:
        get_model("resnet20", **override)
    assert next(iter(override)) in str(err.value)


# ---------------------------------------------------------------------------------------------- stride placement


@pytest.mark.parametrize("stride_on_3x3, conv1_hw", [(False, 28), (True, 56)])
def test_bottleneck_stride_placement_v1_vs_v15(stride_on_3x3, conv1_hw):
    model = get_model("resnet50", stride_on_3x3=stride_on_3x3)
    x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    variables = _abstract_variables(model, x.shape)
    _, out, _ = jax.eval_shape(_recorder(model), variables, x)
    # The first block of stage2 downsamples 56 -> 28: on conv1 in v1 (paper), on conv2 (the 3x3) in v1.5.
    assert out["stage1/block0/conv1"].shape == (1, 56, 56, 64)
    assert out["stage2/block0/conv1"].shape == (1, conv1_hw, conv1_hw, 128)
    assert out["stage2/block0/conv2"].shape == (1, 28, 28, 128)
    assert out["stage2/block0/conv3"].shape == (1, 28, 28, 512)
    assert out["stage2/block0/shortcut/conv"].shape == (1, 28, 28, 512)
    assert out["stage2/block1/conv1"].shape == (1, 28, 28, 128)
    assert out["stage4/block0/conv1"].shape[1] == (7 if not stride_on_3x3 else 14)
    assert out["stage4"].shape == (1, 7, 7, 2048)
    # Same parameters either way.
    assert jax.tree_util.tree_map(lambda a: a.shape, variables) == jax.tree_util.tree_map(
        lambda a: a.shape, _abstract_variables(get_model("resnet50"), x.shape)
    )


def test_imagenet_stem_and_stage_resolutions():
    model = get_model("resnet18")
    x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    _, out, _ = jax.eval_shape(_recorder(model), _abstract_variables(model, x.shape), x)
    assert out["stem_conv"].shape == (1, 112, 112, 64)
    assert [out[f"stage{i}"].shape[1:] for i in (1, 2, 3, 4)] == [
        (56, 56, 64),
        (28, 28, 128),
        (14, 14, 256),
        (7, 7, 512),
    ]


# ---------------------------------------------------------------------------------------------- BatchNorm modes


@pytest.fixture(scope="module")
def bn_setup():
    model = get_model("resnet8")
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 8, 8, 3)) * 2.0 + 0.5
    variables = jax.jit(lambda v: model.init(KEY, v, train=False))(x)
    train = jax.jit(_recorder(model, train=True, mutable=("batch_stats",)))
    evaluate = jax.jit(_recorder(model, train=False, mutable=("batch_stats",)))
    return model, x, variables, train, evaluate


def test_bn_fresh_statistics_are_mean0_var1(bn_setup):
    _, _, variables, _, _ = bn_setup
    stats = _flat(variables["batch_stats"])
    assert len(stats) == 2 * 7  # stem + 3 blocks x 2 BNs, each with mean and var
    for path, v in stats.items():
        np.testing.assert_array_equal(v, np.zeros(v.shape) if path.endswith("mean") else np.ones(v.shape))


def test_bn_train_mode_updates_running_stats_with_flax_momentum(bn_setup):
    _, x, variables, train, _ = bn_setup
    _, _, state = train(variables, x)
    new = _flat(state["batch_stats"])
    old = _flat(variables["batch_stats"])
    assert new.keys() == old.keys()
    for path in new:
        assert not np.allclose(new[path], old[path]), f"{path} not updated in train mode"
    # stem_bn: running = 0.9 * running + 0.1 * batch statistic (Flax's momentum convention).
    z = nn.Conv(16, (3, 3), padding=((1, 1), (1, 1)), use_bias=False).apply(
        {"params": {"kernel": variables["params"]["stem_conv"]["kernel"]}}, x
    )
    np.testing.assert_allclose(new["stem_bn/mean"], 0.1 * z.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(new["stem_bn/var"], 0.9 + 0.1 * z.var(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)


def test_bn_train_mode_normalises_with_batch_statistics(bn_setup):
    _, x, variables, train, evaluate = bn_setup
    y_train, out_train, _ = train(variables, x)
    y_eval, out_eval, _ = evaluate(variables, x)
    stem = out_train["stem_bn"]  # scale 1, bias 0 at init: normalised to mean 0, var 1 over (N, H, W)
    np.testing.assert_allclose(stem.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(stem.var(axis=(0, 1, 2)), 1.0, atol=1e-3)
    # Eval mode with fresh statistics (mean 0, var 1) only divides by sqrt(1 + eps).
    np.testing.assert_allclose(out_eval["stem_bn"], out_eval["stem_conv"] / np.sqrt(1 + 1e-5), rtol=1e-5, atol=1e-6)
    assert not np.allclose(out_eval["stem_bn"], stem, atol=1e-2)
    assert not np.allclose(y_train, y_eval, atol=1e-3)


def test_bn_eval_mode_leaves_stats_unchanged_and_uses_them(bn_setup):
    _, x, variables, train, evaluate = bn_setup
    _, _, state = train(variables, x)
    trained = {"params": variables["params"], "batch_stats": state["batch_stats"]}
    y, _, after = evaluate(trained, x)
    assert _flat(after["batch_stats"]).keys() == _flat(state["batch_stats"]).keys()
    for path, v in _flat(after["batch_stats"]).items():
        np.testing.assert_array_equal(v, _flat(state["batch_stats"])[path])
    # ... and it does read them: other running statistics give other outputs.
    y_fresh, _, _ = evaluate(variables, x)
    assert not np.allclose(y, y_fresh, atol=1e-4)


def test_bn_eval_output_independent_of_other_batch_members(bn_setup):
    _, x, variables, train, evaluate = bn_setup
    other = x.at[1:].set(jax.random.normal(jax.random.PRNGKey(2), x[1:].shape) * 5.0)
    y, _, _ = evaluate(variables, x)
    y_other, _, _ = evaluate(variables, other)
    np.testing.assert_allclose(y[0], y_other[0], rtol=1e-5, atol=1e-6)
    assert not np.allclose(y[1:], y_other[1:], atol=1e-3)
    # In train mode the batch statistics couple the examples.
    t, _, _ = train(variables, x)
    t_other, _, _ = train(variables, other)
    assert not np.allclose(t[0], t_other[0], atol=1e-4)


def test_train_defaults_to_false(bn_setup):
    model, x, variables, _, evaluate = bn_setup
    y = jax.jit(lambda v, a: model.apply(v, a))(variables, x)  # no mutable collection needed
    np.testing.assert_allclose(y, evaluate(variables, x)[0], rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------- intermediates


def test_intermediates_sow_every_3x3_conv_after_bn():
    model = get_model("resnet20")
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 8, 8, 3))
    variables = _filled_variables(model, x.shape)
    _, state = jax.jit(lambda v, a: model.apply(v, a, train=False, mutable=["intermediates"]))(variables, x)
    sown = _sown(state["intermediates"])
    expected = {"stem_bn"} | {f"stage{i}/block{j}/bn{k}" for i in (1, 2, 3) for j in range(3) for k in (1, 2)}
    assert set(sown) == expected
    assert len(sown) == 19  # the stem + 2 per block: every 3x3 conv of CIFAR ResNet-20
    assert sown["stem_bn"].shape == (2, 8, 8, 16)
    assert sown["stage1/block2/bn2"].shape == (2, 8, 8, 16)
    assert sown["stage2/block0/bn1"].shape == (2, 4, 4, 32)
    assert sown["stage3/block1/bn2"].shape == (2, 2, 2, 64)
    for path, v in sown.items():
        assert float(jnp.min(v)) < 0 < float(jnp.max(v)), f"{path}: sown after the ReLU?"


def test_intermediates_are_before_relu_and_addition():
    model = get_model("resnet14")
    x = jax.random.normal(jax.random.PRNGKey(4), (2, 8, 8, 3))
    variables = _filled_variables(model, x.shape)
    _, out, state = jax.jit(_recorder(model, mutable=("intermediates",)))(variables, x)
    sown = _sown(state["intermediates"])
    np.testing.assert_array_equal(sown["stem_bn"], out["stem_bn"])
    np.testing.assert_array_equal(sown["stage2/block1/bn1"], out["stage2/block1/bn1"])
    # Block output = relu(bn2 + shortcut(input)); stage2/block1's shortcut is the identity.
    np.testing.assert_allclose(
        out["stage2/block1"], jax.nn.relu(sown["stage2/block1/bn2"] + out["stage2/block0"]), rtol=1e-6, atol=1e-6
    )


def test_intermediates_not_collected_unless_mutable():
    model = get_model("resnet8")
    x = jax.random.normal(jax.random.PRNGKey(4), (2, 8, 8, 3))
    variables = _filled_variables(model, x.shape)
    y = jax.jit(lambda v, a: model.apply(v, a, train=False))(variables, x)
    assert y.shape == (2, 10)
    assert "intermediates" not in jax.eval_shape(lambda a: model.init(KEY, a, train=False), x)


def test_intermediates_of_a_bottleneck_net():
    model = get_model("resnet50")
    x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    variables = _abstract_variables(model, x.shape)
    _, state = jax.eval_shape(lambda v, a: model.apply(v, a, train=False, mutable=["intermediates"]), variables, x)
    sown = _sown(state["intermediates"])
    assert len(sown) == 1 + 3 * 16  # the 7x7 stem and every conv of the 16 bottleneck blocks
    assert sown["stage2/block0/bn2"].shape == (1, 28, 28, 128)  # the 3x3
    assert sown["stage4/block2/bn3"].shape == (1, 7, 7, 2048)


# ---------------------------------------------------------------------------------------------- dtype


def test_bfloat16_compute_with_float32_params():
    model = get_model("resnet8", dtype=jnp.bfloat16)
    x = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)
    variables = _abstract_variables(model, x.shape)
    assert {v.dtype for v in jax.tree_util.tree_leaves(variables)} == {jnp.dtype(jnp.float32)}
    logits, out, _ = jax.eval_shape(_recorder(model), variables, x)
    for path in ("stem_conv", "stem_bn", "stage1/block0/conv1", "stage3/block0/bn2", "stage3", "fc"):
        assert out[path].dtype == jnp.bfloat16, path
    assert logits.dtype == jnp.float32  # logits are returned in float32 for a stable loss
    # Control: the default computes in float32, and param_dtype can be lowered separately.
    _, out32, _ = jax.eval_shape(_recorder(get_model("resnet8")), variables, x)
    assert out32["stage3"].dtype == jnp.float32
    half = _abstract_variables(get_model("resnet8", param_dtype=jnp.bfloat16), x.shape)
    assert {v.dtype for v in jax.tree_util.tree_leaves(half["params"])} == {jnp.dtype(jnp.bfloat16)}


# ---------------------------------------------------------------------------------------------- parameters


def test_parameter_paths_are_readable():
    params = {
        k: v.shape for k, v in _flat(_abstract_variables(get_model("resnet20"), (1, 32, 32, 3))["params"]).items()
    }
    assert {p.split("/")[0] for p in params} == {"stem_conv", "stem_bn", "stage1", "stage2", "stage3", "fc"}
    assert params["stem_conv/kernel"] == (3, 3, 3, 16)
    assert params["stage2/block0/conv1/kernel"] == (3, 3, 16, 32)
    assert params["stage2/block0/bn1/scale"] == (32,)
    assert params["stage3/block2/conv2/kernel"] == (3, 3, 64, 64)
    assert params["fc/kernel"] == (64, 10)
    assert params["fc/bias"] == (10,)
    assert not [p for p in params if re.search(r"(Conv|BatchNorm|Dense|Stage|Block)_\d", p)]
    imagenet = _flat(_abstract_variables(get_model("resnet18"), (1, 224, 224, 3))["params"])
    assert imagenet["stem_conv/kernel"].shape == (7, 7, 3, 64)


@pytest.mark.parametrize("name", ["resnet20", "resnet50"])
def test_convs_have_no_bias_and_each_is_followed_by_its_bn(name):
    params = _flat(_abstract_variables(get_model(name), (1, *_hw(name), 3))["params"])
    convs = {p.rsplit("/", 1)[0] for p in params if re.search(r"(^|/)(stem_)?conv\d?/", p)}
    assert convs
    for conv in convs:
        assert f"{conv}/bias" not in params, f"{conv} has a bias"
        bn = re.sub(r"conv(\d?)$", r"bn\1", conv)
        assert params[f"{bn}/scale"].shape == params[f"{bn}/bias"].shape == (params[f"{conv}/kernel"].shape[-1],)


def test_conv_kernels_are_he_normal(bn_setup):
    _, _, variables, _, _ = bn_setup  # resnet8 as initialised by the model itself
    params = variables["params"]
    w = np.asarray(params["stage3"]["block0"]["conv2"]["kernel"])  # 3x3x64x64
    std = np.sqrt(2.0 / (3 * 3 * 64))
    assert abs(w.std() / std - 1) < 0.03
    assert abs(w.mean()) < 0.05 * std
    # Not truncated at 2 sigma (as variance_scaling's default "truncated_normal" would be).
    assert np.mean(np.abs(w) > 2.5 * std) > 0.005
    assert params["stem_bn"]["scale"].min() == params["stem_bn"]["scale"].max() == 1.0


def test_resnet_rejects_bad_fields():
    x = jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32)
    for kwargs, match in [
        (dict(block="wide"), "block"),
        (dict(stem="tiny"), "stem"),
        (dict(widths=(16, 32)), "same length"),
        (dict(shortcut="D"), "shortcut"),
    ]:
        fields = dict(stage_sizes=(1, 1, 1), widths=(16, 32, 64))
        fields.update(kwargs)
        model = ResNet(**fields)
        with pytest.raises(ValueError, match=match):
            jax.eval_shape(lambda v, m=model: m.init(KEY, v, train=False), x)


INIT_SHAPES = [(3, 3, 16, 16), (1, 1, 8, 2)]  # a CIFAR conv; an odd size (threefry pads it)


@pytest.mark.parametrize("o1", [True, False], ids=["O1", "jax-code"])
@pytest.mark.parametrize("key", [jax.random.PRNGKey(3), jax.random.key(3, impl="rbg")], ids=["threefry", "rbg"])
def test_initializers_give_jaxs_values(key, o1, monkeypatch):
    """resflax's initialisers compile the eager draw at LLVM -O1 on the CPU (several times faster to compile):
    the values are bit for bit JAX's own initialisers', eagerly and traced inside ``jit``, on the installed JAX
    (0.12 scales a normal draw in another order than 0.10/0.11, see ``initializers.JAX_SCALES_INSIDE``). Both
    paths are checked whatever the jaxlib: the -O1 one (taken where ``xla.TESTED_JAXLIB`` lists the jaxlib)
    and the one through JAX's own code (elsewhere)."""
    from resflax.models import initializers  # noqa: PLC0415

    monkeypatch.setattr(initializers, "_tested_jaxlib", lambda: o1)
    pairs = [
        (initializers.he_normal, nn.initializers.variance_scaling(2.0, "fan_in", "normal")),
        (initializers.variance_scaling(2.0, "fan_out", "normal"),
         nn.initializers.variance_scaling(2.0, "fan_out", "normal")),
        (initializers.lecun_normal, nn.initializers.lecun_normal()),
        (initializers.normal(0.01), nn.initializers.normal(0.01)),
    ]
    for i, shape in enumerate(INIT_SHAPES if key.dtype == jnp.uint32 else INIT_SHAPES[:1]):
        k = jax.random.fold_in(key, i)
        for ours, jaxs in pairs:
            np.testing.assert_array_equal(np.asarray(ours(k, shape, jnp.float32)),
                                          np.asarray(jaxs(k, shape, jnp.float32)))
    for ours, jaxs in (pairs[0], pairs[3]) if not o1 else ():  # traced: never the -O1 path
        ours, jaxs = (jax.jit(f, static_argnums=(1, 2)) for f in (ours, jaxs))
        np.testing.assert_array_equal(np.asarray(ours(key, INIT_SHAPES[0], jnp.float32)),
                                      np.asarray(jaxs(key, INIT_SHAPES[0], jnp.float32)))
    with pytest.raises(ValueError, match="rank 1"):
        initializers.he_normal(key, (16,))
