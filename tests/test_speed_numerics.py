"""The speed-optimised layers and step match straightforward references within float tolerance."""

import json
import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from resflax.models import fastops, get_model

RTOL, ATOL = 2e-4, 2e-4


def _close(a, b, rtol=RTOL, atol=ATOL):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        scale = max(1.0, float(np.max(np.abs(np.asarray(y)))))
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol * scale)


def _bn_pair(**kw):
    return fastops.BatchNorm(momentum=0.9, epsilon=1e-5, **kw), nn.BatchNorm(momentum=0.9, epsilon=1e-5, **kw)


@pytest.mark.parametrize("shape", [(8, 6, 6, 5), (4, 3, 3, 16)])
def test_batchnorm_matches_flax(shape):
    rs = np.random.RandomState(0)
    x = jnp.asarray(rs.randn(*shape).astype(np.float32) * 3 + 1)
    g = jnp.asarray(rs.randn(*shape).astype(np.float32))
    fast, ref = _bn_pair()
    v_fast = fast.init(jax.random.PRNGKey(0), x, use_running_average=False)
    v_ref = ref.init(jax.random.PRNGKey(0), x, use_running_average=False)
    assert jax.tree_util.tree_structure(v_fast) == jax.tree_util.tree_structure(v_ref)
    params = {"scale": jnp.asarray(rs.rand(shape[-1]).astype(np.float32) + 0.5),
              "bias": jnp.asarray(rs.randn(shape[-1]).astype(np.float32))}

    def run(mod, v):
        def f(p, x):
            y, upd = mod.apply({"params": p, "batch_stats": v["batch_stats"]}, x, use_running_average=False,
                               mutable=["batch_stats"])
            return jnp.sum(y * g), (y, upd)

        (_, (y, upd)), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(params, x)
        return y, upd, grads

    y1, u1, g1 = run(fast, v_fast)
    y2, u2, g2 = run(ref, v_ref)
    _close(y1, y2)
    _close(u1, u2)
    _close(g1, g2)
    # eval mode uses the running statistics
    e1 = fast.apply({"params": params, **u1}, x, use_running_average=True)
    e2 = ref.apply({"params": params, **u2}, x, use_running_average=True)
    _close(e1, e2)


@pytest.mark.parametrize("strides,padding,ks", [(1, ((1, 1), (1, 1)), 3), (2, ((1, 1), (1, 1)), 3),
                                                (2, "VALID", 1), (1, "SAME", 3), (2, ((3, 3), (3, 3)), 7)])
def test_conv_matches_flax(strides, padding, ks):
    rs = np.random.RandomState(1)
    x = jnp.asarray(rs.randn(4, 8, 8, 6).astype(np.float32))
    kw = dict(features=7, kernel_size=(ks, ks), strides=strides, padding=padding, use_bias=False)
    fast, ref = fastops.Conv(**kw), nn.Conv(**kw)
    p = ref.init(jax.random.PRNGKey(0), x)
    assert jax.tree_util.tree_structure(fast.init(jax.random.PRNGKey(0), x)) == jax.tree_util.tree_structure(p)
    g = jnp.asarray(rs.randn(*ref.apply(p, x).shape).astype(np.float32))

    def grads(mod):
        return jax.value_and_grad(lambda p, x: jnp.sum(mod.apply(p, x) * g), argnums=(0, 1))(p, x)

    _close(grads(fast), grads(ref))


def test_barrier_is_identity_with_identity_gradient():
    x = jnp.arange(6.0)
    np.testing.assert_array_equal(fastops.barrier(x), x)
    np.testing.assert_array_equal(jax.grad(lambda x: jnp.sum(fastops.barrier(x) * 2.0))(x), 2.0 * jnp.ones(6))


@pytest.mark.parametrize("name", ["resnet8", "plain8"])
def test_fast_model_matches_flax_model(name):
    """Same parameter tree; logits, loss gradients and BN running statistics agree (train and eval)."""
    fast, ref = get_model(name, impl="fast"), get_model(name, impl="flax", barriers=False)
    rs = np.random.RandomState(0)
    x = jnp.asarray(rs.randn(8, 32, 32, 3).astype(np.float32))
    y = jnp.asarray(rs.randint(0, 10, 8))
    v = ref.init(jax.random.PRNGKey(0), x, train=False)
    v_fast = fast.init(jax.random.PRNGKey(0), x, train=False)
    assert jax.tree_util.tree_structure(v_fast) == jax.tree_util.tree_structure(v)
    _close(v_fast, v, rtol=0, atol=0)  # same initialisation

    def run(model):
        def loss_fn(p):
            logits, nv = model.apply({"params": p, "batch_stats": v["batch_stats"]}, x, train=True,
                                     mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), (logits, nv)

        (loss, (logits, nv)), grads = jax.value_and_grad(loss_fn, has_aux=True)(v["params"])
        ev = model.apply({"params": v["params"], "batch_stats": nv["batch_stats"]}, x, train=False)
        return loss, logits, nv, grads, ev

    out_fast, out_ref = run(fast), run(ref)
    _close(out_fast, out_ref, rtol=1e-3, atol=1e-4)


SYNC_SCRIPT = textwrap.dedent("""
    import functools, json, sys
    import jax, numpy as np
    from resflax.models import get_model
    from resflax.train import state as st, step as sp
    out = {}
    for impl in ("fast", "flax"):
        model = get_model("resnet8", bn_axis_name=sp.AXIS, impl=impl, barriers=impl == "fast")
        txf = functools.partial(st.make_optimizer, momentum=0.9, weight_decay=1e-4, weight_decay_on="all")
        mesh = sp.make_mesh(2)
        s = sp.replicate(st.init_state(model, txf, 0, (32, 32, 3), warmup=False), mesh)
        cfg = sp.step_config((1000,), batch_size=16, base_lr=0.1, factor=0.1, warmup_lr=0.01,
                             warmup_until_error=0.8)
        rs = np.random.RandomState(0)
        data = sp.replicate((rs.randint(0, 256, (64, 32, 32, 3)).astype(np.uint8),
                             rs.randint(0, 10, 64).astype(np.int32), np.full((32, 32, 3), 0.5, np.float32)), mesh)
        step = sp.make_train_step(model, txf(s.params), cfg, mesh)
        losses = []
        for _ in range(3):
            s, m = step(s, *data)
            losses.append(float(m["loss"]))
        out[impl] = {"losses": losses, "params": [float(np.asarray(l).sum()) for l in
                     jax.tree_util.tree_leaves((s.params, s.batch_stats))]}
    print(json.dumps(out))
""")


def test_fast_model_sync_bn_two_devices_matches_flax():
    """Synchronised BN (custom gradient with pmean) under the real 2-device train step = nn.BatchNorm's."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()
    res = subprocess.run([sys.executable, "-c", SYNC_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(out["fast"]["losses"], out["flax"]["losses"], rtol=1e-4)
    np.testing.assert_allclose(out["fast"]["params"], out["flax"]["params"], rtol=1e-3, atol=1e-3)


def test_default_xla_flags_respect_user_and_version(monkeypatch):
    from resflax import xla

    assert xla.default_flags("0.0.1") == []
    assert xla.default_flags(xla.TESTED_JAXLIB[0]) == [f"{xla.YNN_FLAG}={xla.YNN_VALUE}"]
