"""Scanned stages (``ResNet.scan_min_blocks``) and packed blocks: the same network, executed differently.

A stage with at least ``scan_min_blocks`` blocks runs blocks 1..n-1 as one ``lax.scan`` so that deep nets
(ResNet-1202) compile in seconds; the train state holds those blocks stacked (``pack_blocks``). None of this
may change a number: outputs, gradients and BN statistics must equal the unrolled network's (bit for bit at
the paper's widths, where XLA runs the same kernels; up to float rounding otherwise).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from synthetic import tiny_step

from resflax.models import get_model, pack_blocks, unpack_blocks


def _x(n=2):
    return jax.random.normal(jax.random.PRNGKey(0), (n, 32, 32, 3))


def _equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _close(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        y = np.asarray(y)
        # atol: 1e-5 of the leaf's scale; the worst seen, 1.2e-6 (a gradient of 8 elements, jaxlib 0.12.0.1 on an
        # AMD EPYC Zen 4 CPU), is float32 rounding (the paper's widths are compared bit for bit)
        np.testing.assert_allclose(np.asarray(x), y, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(y).max())))


def _train_out(model, variables, x):
    def loss(params):
        y, new = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, train=True,
                             mutable=["batch_stats"])
        return jnp.sum(y ** 2), (y, new["batch_stats"])

    (_, (y, stats)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
    return y, stats, grads


@pytest.mark.parametrize("name,overrides,exact", [
    ("resnet20", {}, True),  # the paper's widths: XLA runs the same kernels, the numbers are the same bits
    # bottleneck blocks with projections everywhere, narrow test widths: XLA may pick other kernels inside
    # the loop, equal up to float rounding
    ("resnet20", {"block": "bottleneck", "widths": (2, 4, 8), "stem_width": 8, "shortcut": "C"}, False),
])
def test_scanned_stage_equals_unrolled(name, overrides, exact):
    unrolled = get_model(name, scan_min_blocks=None, **overrides)
    scanned = get_model(name, scan_min_blocks=2, **overrides)
    x = _x()
    v = unrolled.init(jax.random.PRNGKey(1), x, train=False)
    # initialisation is the unrolled one either way: same names, same values
    _equal(scanned.init(jax.random.PRNGKey(1), x, train=False), v)
    y_u, s_u, g_u = _train_out(unrolled, v, x)
    packed = pack_blocks(scanned, v)
    # packed variables (the train state's), and per-block ones (stacked on every call) once
    for variables in (packed, v) if exact else (packed,):
        y_s, s_s, g_s = _train_out(scanned, variables, x)
        for a, b in ((y_s, y_u), (unpack_blocks(scanned, s_s), s_u), (unpack_blocks(scanned, g_s), g_u)):
            (_equal if exact else _close)(a, b)
    # eval mode: the same up to float rounding (XLA fuses the scanned and unrolled BN differently)
    ref = np.asarray(jax.jit(unrolled.apply)(v, x))
    got = jax.jit(scanned.apply)(packed, x)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


def test_pack_unpack_are_exact_inverses_and_stack_blocks():
    model = get_model("resnet26", scan_min_blocks=2)  # 4 blocks per stage: block0 + block1-3
    v = model.init(jax.random.PRNGKey(0), _x(1), train=False)
    packed = pack_blocks(model, v)
    stage = packed["params"]["stage2"]
    assert sorted(stage) == ["block0", "block1-3"]
    assert stage["block1-3"]["conv1"]["kernel"].shape == (3, 3, 3, 32, 32)
    np.testing.assert_array_equal(stage["block1-3"]["conv2"]["kernel"][1],
                                  v["params"]["stage2"]["block2"]["conv2"]["kernel"])
    _equal(unpack_blocks(model, packed), v)
    _equal(pack_blocks(model, packed), packed)  # idempotent
    unrolled = get_model("resnet26", scan_min_blocks=None)
    _equal(pack_blocks(unrolled, v), v)  # nothing to pack when no stage scans


def test_packed_variables_in_an_unrolled_call_raise_a_clear_error():
    model = get_model("resnet26", scan_min_blocks=2)
    v = pack_blocks(model, model.init(jax.random.PRNGKey(0), _x(1), train=False))
    with pytest.raises(ValueError, match="unpack_blocks"):
        get_model("resnet26", scan_min_blocks=None).apply(v, _x(1))
    with pytest.raises(ValueError, match="unpack_blocks"):  # collecting intermediates unrolls
        model.apply(v, _x(1), mutable=["intermediates"])
    _, inter = model.apply(unpack_blocks(model, v), _x(1), mutable=["intermediates"])
    assert len(inter["intermediates"]["stage3"]) == 4


def test_only_resnet1202_scans_by_default():
    for name in ("resnet20", "resnet110", "plain110", "resnet152", "resnet50"):
        m = get_model(name)
        assert all(n < m.scan_min_blocks for n in m.stage_sizes), name
    m = get_model("resnet1202")
    assert all(n >= m.scan_min_blocks for n in m.stage_sizes)


def test_train_state_of_a_scanning_model_is_packed_and_trains_like_the_unrolled_one():
    scanned = get_model("resnet26", scan_min_blocks=3)
    unrolled = get_model("resnet26", scan_min_blocks=None)
    step_s, st_s, data = tiny_step(scanned)
    step_u, st_u, _ = tiny_step(unrolled)
    assert "block1-3" in st_s.params["stage1"] and "block1-3" in st_s.batch_stats["stage1"]
    assert len(jax.tree_util.tree_leaves(st_s.params)) < len(jax.tree_util.tree_leaves(st_u.params))
    st_s, m_s = step_s(st_s, *data)
    st_u, m_u = step_u(st_u, *data)
    np.testing.assert_array_equal(np.asarray(m_s["loss"]), np.asarray(m_u["loss"]))
    # one program each: XLA may fuse reductions differently, so the updated state is equal up to rounding
    # (measured: 3e-8 after one step; with random labels and lr 0.1 rounding then grows ~30x per step)
    unpacked = {"params": unpack_blocks(scanned, st_s.params), "batch_stats": unpack_blocks(scanned, st_s.batch_stats)}
    ref = {"params": st_u.params, "batch_stats": st_u.batch_stats}
    assert jax.tree_util.tree_structure(unpacked) == jax.tree_util.tree_structure(ref)
    for a, b in zip(jax.tree_util.tree_leaves(unpacked), jax.tree_util.tree_leaves(ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    _, m_s = step_s(st_s, *data)
    _, m_u = step_u(st_u, *data)
    np.testing.assert_allclose(np.asarray(m_s["loss"]), np.asarray(m_u["loss"]), rtol=1e-5)
