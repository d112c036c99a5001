"""The speed-optimised layers and step match straightforward references within float tolerance.

Trees (outputs, gradients, BN statistics) are compared leaf by leaf and element by element by
``assert_trees_close``: the same paths, shapes and dtypes on both sides, then every element. A leaf scaled by
2, two leaves swapped or a missing/renamed leaf fails (``test_tree_comparison_catches_wrong_leaves``).
"""

import functools
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

# Tolerances, relative to the scale of each leaf. Both implementations compute the same float32 formulas
# (biased batch variance as E[x^2] - E[x]^2, Flax's momentum rule) and differ only in the order of float
# roundings: fused one-pass moments vs Flax's, the hand-written BN and ReLU backward passes, and the input
# gradient of the 3x3 convolution as a forward convolution of the flipped kernel. Largest difference observed
# on CPU (jaxlib 0.10.2), as a fraction of the leaf's largest magnitude: 7e-7 for single layers, 1.5e-6 for one
# forward/backward of ResNet-8/Plain-8, 1.7e-6 for the 2-device synchronised-BN gradients and 1.4e-6 for the
# parameters after three train steps; 1.3e-7 for the BN statistics. Element-wise check:
# |fast - flax| <= ATOL * max|flax leaf| + RTOL * |flax|. The absolute part is relative to the leaf (not to 1.0)
# so that small leaves -- most gradients are ~1e-2 -- are checked as tightly as large ones. 1e-5 leaves a ~6x
# margin over what was observed, while a real error (a missing term, a factor, a wrong statistic, even a
# relative error of 1e-4 in one leaf) is larger than the tolerance.
RTOL, ATOL = 1e-5, 1e-5


def _leaves(tree):
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return [jax.tree_util.keystr(p) for p, _ in flat], [np.asarray(x) for _, x in flat], treedef


def assert_trees_close(actual, desired, rtol=RTOL, atol=ATOL, what="", nonzero=False):
    """Same structure, paths, shapes and dtypes; every element within ``atol * max|leaf| + rtol * |desired|``.

    ``nonzero``: also require every leaf of ``desired`` to have a non-zero element (so that a comparison of
    two all-zero gradients cannot pass by accident)."""
    pa, la, ta = _leaves(actual)
    pd, ld, td = _leaves(desired)
    assert pa == pd, f"{what}: different leaves\n  actual:  {pa}\n  desired: {pd}"
    assert ta == td, f"{what}: different tree structure: {ta} vs {td}"
    assert pa, f"{what}: empty tree"
    for path, a, d in zip(pa, la, ld):
        assert a.shape == d.shape and a.dtype == d.dtype, f"{what}{path}: {a.shape}/{a.dtype} vs {d.shape}/{d.dtype}"
        scale = float(np.max(np.abs(d))) if d.size else 0.0
        if nonzero:
            assert scale > 0, f"{what}{path}: all zero"
        np.testing.assert_allclose(a, d, rtol=rtol, atol=atol * scale, err_msg=f"{what}{path}")


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
    assert_trees_close(v_fast, v_ref, rtol=0, atol=0, what="init")  # same names, shapes, initial values
    params = {"scale": jnp.asarray(rs.rand(shape[-1]).astype(np.float32) + 0.5),
              "bias": jnp.asarray(rs.randn(shape[-1]).astype(np.float32))}
    # running statistics that are not the initial ones, so that the momentum rule is exercised
    stats = {"mean": jnp.asarray(rs.randn(shape[-1]).astype(np.float32)),
             "var": jnp.asarray(rs.rand(shape[-1]).astype(np.float32) + 0.5)}

    def run(mod):
        def f(p, x):
            y, upd = mod.apply({"params": p, "batch_stats": stats}, x, use_running_average=False,
                               mutable=["batch_stats"])
            return jnp.sum(y * g), (y, upd)

        (_, (y, upd)), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(params, x)
        return y, upd, grads

    y1, u1, g1 = run(fast)
    y2, u2, g2 = run(ref)
    assert_trees_close(y1, y2, what="train output")
    assert_trees_close(u1, u2, what="updated batch_stats")
    assert_trees_close(g1, g2, what="gradients (params, x)", nonzero=True)
    # the reference itself against numpy: batch moments (biased variance) and the Flax momentum rule
    xn = np.asarray(x, np.float64)
    mean, var = xn.mean((0, 1, 2)), xn.var((0, 1, 2))
    np.testing.assert_allclose(u2["batch_stats"]["mean"], 0.9 * np.asarray(stats["mean"]) + 0.1 * mean, rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(u2["batch_stats"]["var"], 0.9 * np.asarray(stats["var"]) + 0.1 * var, rtol=1e-5)
    y_np = (xn - mean) / np.sqrt(var + 1e-5) * np.asarray(params["scale"]) + np.asarray(params["bias"])
    np.testing.assert_allclose(y1, y_np, rtol=1e-5, atol=1e-5)
    # eval mode uses the running statistics
    e1 = fast.apply({"params": params, **u1}, x, use_running_average=True)
    e2 = ref.apply({"params": params, **u2}, x, use_running_average=True)
    assert_trees_close(e1, e2, what="eval output")


@pytest.mark.parametrize("strides,padding,ks", [(1, ((1, 1), (1, 1)), 3), (2, ((1, 1), (1, 1)), 3),
                                                (2, "VALID", 1), (1, "SAME", 3), (2, ((3, 3), (3, 3)), 7)])
def test_conv_matches_flax(strides, padding, ks):
    rs = np.random.RandomState(1)
    x = jnp.asarray(rs.randn(4, 8, 8, 6).astype(np.float32))
    kw = dict(features=7, kernel_size=(ks, ks), strides=strides, padding=padding, use_bias=False)
    fast, ref = fastops.Conv(**kw), nn.Conv(**kw)
    p = ref.init(jax.random.PRNGKey(0), x)
    assert_trees_close(fast.init(jax.random.PRNGKey(0), x), p, rtol=0, atol=0, what="init")
    g = jnp.asarray(rs.randn(*ref.apply(p, x).shape).astype(np.float32))

    def grads(mod):
        with jax.default_matmul_precision("float32"):  # full float32 on any backend (no TF32 on GPUs)
            return jax.value_and_grad(lambda p, x: jnp.sum(mod.apply(p, x) * g), argnums=(0, 1))(p, x)

    assert_trees_close(grads(fast), grads(ref), what="(value, (dkernel, dx))", nonzero=True)


def test_barrier_is_identity_with_identity_gradient():
    x = jnp.arange(6.0)
    np.testing.assert_array_equal(fastops.barrier(x), x)
    np.testing.assert_array_equal(jax.grad(lambda x: jnp.sum(fastops.barrier(x) * 2.0))(x), 2.0 * jnp.ones(6))


@functools.cache
def _model_runs(name):
    """(fast, flax) results of one train-mode forward/backward of ``name`` and an eval pass after it."""
    fast, ref = get_model(name, impl="fast"), get_model(name, impl="flax", barriers=False)
    rs = np.random.RandomState(0)
    x = jnp.asarray(rs.randn(8, 32, 32, 3).astype(np.float32))
    y = jnp.asarray(rs.randint(0, 10, 8))
    v = ref.init(jax.random.PRNGKey(0), x, train=False)
    v_fast = fast.init(jax.random.PRNGKey(0), x, train=False)

    def run(model):
        def loss_fn(p):
            logits, nv = model.apply({"params": p, "batch_stats": v["batch_stats"]}, x, train=True,
                                     mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), (logits, nv)

        with jax.default_matmul_precision("float32"):
            (loss, (logits, nv)), grads = jax.value_and_grad(loss_fn, has_aux=True)(v["params"])
            ev = model.apply({"params": v["params"], "batch_stats": nv["batch_stats"]}, x, train=False)
        return {"loss": loss, "logits": logits, "batch_stats": nv, "grads": grads, "eval_logits": ev}

    return v_fast, v, run(fast), run(ref)


@pytest.mark.parametrize("name", ["resnet8", "plain8"])
def test_fast_model_matches_flax_model(name):
    """Same parameter tree; logits, loss, every gradient leaf and every BN running statistic agree (train and
    eval), leaf by leaf and element-wise."""
    v_fast, v, out_fast, out_ref = _model_runs(name)
    assert_trees_close(v_fast, v, rtol=0, atol=0, what="init")  # same names, shapes and initial values
    assert len(jax.tree_util.tree_leaves(v["params"])) == 23 and len(jax.tree_util.tree_leaves(v["batch_stats"])) == 14
    for key in ("loss", "logits", "batch_stats", "eval_logits"):
        assert_trees_close(out_fast[key], out_ref[key], what=key)
    assert_trees_close(out_fast["grads"], out_ref["grads"], what="grads", nonzero=True)
    # the statistics moved away from their initial values (a test of the update, not of the init)
    for path, new, old in zip(*_leaves(out_ref["batch_stats"]["batch_stats"])[:2], _leaves(v["batch_stats"])[1]):
        assert np.max(np.abs(new - old)) > 1e-3, path


def test_tree_comparison_catches_wrong_leaves():
    """The comparison used above fails for a gradient leaf scaled by 2, two same-shape leaves swapped, one
    element off by 1e-3 relative, a renamed leaf and a cast leaf."""
    _, _, out_fast, out_ref = _model_runs("resnet8")
    grads, ref = out_fast["grads"], out_ref["grads"]
    assert_trees_close(grads, ref, nonzero=True)
    bn = ["stage2", "block0", "bn1"]

    def edit(fn):
        g = jax.tree_util.tree_map(np.asarray, grads)
        node = g
        for k in bn:
            node = node[k]
        fn(g, node)
        return g

    def scale2(g, node):
        node["scale"] = node["scale"] * 2

    def swap(g, node):
        node["scale"], node["bias"] = node["bias"], node["scale"]

    def one_element(g, node):
        k = np.array(g["fc"]["kernel"])
        i = np.unravel_index(np.argmax(np.abs(k)), k.shape)
        k[i] *= 1 + 1e-3
        g["fc"]["kernel"] = k

    def rename(g, node):
        node["scale2"] = node.pop("scale")

    def cast(g, node):
        node["bias"] = node["bias"].astype(np.float64)

    for fn in (scale2, swap, one_element, rename, cast):
        with pytest.raises(AssertionError):
            assert_trees_close(edit(fn), ref, what=fn.__name__)


SYNC_SCRIPT = textwrap.dedent("""
    import functools, json, sys
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import PartitionSpec as P
    from resflax.models import get_model
    from resflax.train import state as st, step as sp
    arrays, paths = {}, {}

    def put(impl, name, tree):
        flat = jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]
        paths.setdefault(impl, {})[name] = [jax.tree_util.keystr(p) for p, _ in flat]
        for i, (_, leaf) in enumerate(flat):
            arrays[f"{impl}.{name}.{i}"] = np.asarray(leaf)

    mesh = sp.make_mesh(2)
    rs = np.random.RandomState(0)
    xb = rs.randn(16, 32, 32, 3).astype(np.float32)
    yb = rs.randint(0, 10, 16).astype(np.int32)
    images = rs.randint(0, 256, (64, 32, 32, 3)).astype(np.uint8)
    labels = rs.randint(0, 10, 64).astype(np.int32)
    for impl in ("fast", "flax"):
        model = get_model("resnet8", bn_axis_name=sp.AXIS, impl=impl, barriers=impl == "fast")
        txf = functools.partial(st.make_optimizer, momentum=0.9, weight_decay=1e-4, weight_decay_on="all")
        s = st.init_state(model, txf, 0, (32, 32, 3), warmup=False)

        # one forward/backward of a fixed global batch, half on each device, gradients and statistics pmean'd
        def per_device(params, stats, x, y):
            def loss_fn(p):
                logits, nv = model.apply({"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
                return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), (logits, nv["batch_stats"])
            (loss, (logits, nv)), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
            loss, g, nv = jax.lax.pmean((loss, g, nv), sp.AXIS)
            return loss, logits, g, nv

        f = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), P(sp.AXIS), P(sp.AXIS)),
                                  out_specs=(P(), P(sp.AXIS), P(), P()), check_vma=False))
        loss, logits, grads, stats = f(s.params, s.batch_stats, xb, yb)
        for name, tree in (("loss", loss), ("logits", logits), ("grads", grads), ("batch_stats", stats)):
            put(impl, name, tree)

        # three steps of the real train step (augmentation, optimizer, pmean of everything)
        s = sp.replicate(s, mesh)
        cfg = sp.step_config((1000,), batch_size=16, base_lr=0.1, factor=0.1, warmup_lr=0.01,
                             warmup_until_error=0.8)
        data = sp.replicate((images, labels, np.full((32, 32, 3), 0.5, np.float32)), mesh)
        step = sp.make_train_step(model, txf(s.params), cfg, mesh)
        losses = []
        for _ in range(3):
            s, m = step(s, *data)
            losses.append(np.asarray(m["loss"]))
        put(impl, "step_losses", np.stack(losses))
        put(impl, "step_params", s.params)
        put(impl, "step_batch_stats", s.batch_stats)
    np.savez(sys.argv[1], **arrays)
    print(json.dumps(paths))
""")


def _run_sync_script(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()
    out = tmp_path / "sync.npz"
    res = subprocess.run([sys.executable, "-c", SYNC_SCRIPT, str(out)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    paths = json.loads(res.stdout.strip().splitlines()[-1])
    arrays = np.load(out)

    def tree(impl, name):  # {path: leaf} in flattening order
        return {p: arrays[f"{impl}.{name}.{i}"] for i, p in enumerate(paths[impl][name])}

    return tree


def test_fast_model_sync_bn_two_devices_matches_flax(tmp_path):
    """Synchronised BN (custom gradient with pmean) on 2 devices = nn.BatchNorm's: one forward/backward of a
    fixed batch (logits, loss, every gradient and statistic leaf), then three real train steps (losses, every
    parameter and statistic leaf)."""
    tree = _run_sync_script(tmp_path)
    for name in ("loss", "logits", "batch_stats"):
        assert_trees_close(tree("fast", name), tree("flax", name), what=name)
    grads = tree("flax", "grads")
    assert len(grads) == 23 and all(k.endswith(("['kernel']", "['scale']", "['bias']")) for k in grads)
    assert_trees_close(tree("fast", "grads"), grads, what="grads", nonzero=True)
    assert tree("fast", "logits")[""].shape == (16, 10)  # both halves of the batch came back
    for name in ("step_losses", "step_params", "step_batch_stats"):
        assert_trees_close(tree("fast", name), tree("flax", name), what=name)
    assert len(tree("flax", "step_params")) == 23 and len(tree("flax", "step_batch_stats")) == 14


def test_default_xla_flags_respect_user_and_version():
    from resflax import xla

    assert xla.default_flags("0.0.1") == []
    assert xla.default_flags(xla.TESTED_JAXLIB[0], cpu=frozenset({"avx2"})) == [f"{xla.YNN_FLAG}={xla.YNN_VALUE}"]
    # where YNNPACK fusions were measured to compute wrong sync-BN gradients: none (XLA's own default)
    assert xla.default_flags(xla.TESTED_JAXLIB[0], cpu=frozenset({"avx2", "avx512_fp16"})) == []
    assert xla.default_flags() == xla.default_flags(cpu=xla.cpu_features())


def test_initializer_gate_is_the_jaxlib_version_only():
    """The -O1 eager draws (resflax.models.initializers) depend on the jaxlib version, not on whether this CPU
    gets the YNN flag: on an AVX512-FP16 CPU with jaxlib 0.10.2 they are on."""
    import jaxlib

    from resflax import xla
    from resflax.models import initializers

    assert initializers._tested_jaxlib() == (jaxlib.__version__ in xla.TESTED_JAXLIB)


def test_default_xla_flag_follows_the_cpu():
    """Without RESFLAX_XLA_DEFAULTS=force, a fresh process adds the flag exactly where default_flags says for
    this machine's CPU."""
    from resflax import xla

    out = _xla_child()
    assert out["after"] == (" ".join(xla.default_flags()) or None)


# A fresh interpreter: XLA_FLAGS before and after `import resflax.models`, what further configure() calls
# add, the device count, and how many YNNPACK fusions XLA:CPU compiles for a pure reduction and for a pure
# elementwise function. With jaxlib 0.10.2, XLA's default ynn_fusion_type puts reductions (not elementwise
# ops) through YNNPACK, "eltwise" elementwise ops only, and resflax's "eltwise,reduce" both; so the counts say
# which value XLA actually runs with.
XLA_SCRIPT = textwrap.dedent("""
    import json, os
    before = os.environ.get("XLA_FLAGS")
    import resflax.models  # noqa: F401  (configures XLA_FLAGS on import)
    from resflax import xla
    after_import = os.environ.get("XLA_FLAGS")
    again = xla.configure()  # a second call
    xla._configured = None  # a configure() that does not remember the first one (e.g. a reloaded module)
    fresh = xla.configure()
    import jax, jax.numpy as jnp
    x = jnp.ones((256, 512), jnp.float32)

    def ynn(f):
        return jax.jit(f).lower(x).compile().as_text().count("__ynn_fusion")

    print(json.dumps({"before": before, "after_import": after_import, "after": os.environ.get("XLA_FLAGS"),
                      "again": again, "fresh": fresh, "devices": jax.device_count(), "sum": float(jnp.sum(x)),
                      "reduce_ynn": ynn(lambda a: a.sum(axis=0)), "eltwise_ynn": ynn(lambda a: jnp.tanh(a) * a)}))
""")


def _xla_child(xla_flags=None, defaults=None):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "RESFLAX_XLA_DEFAULTS")}
    env["JAX_PLATFORMS"] = "cpu"
    if xla_flags is not None:
        env["XLA_FLAGS"] = xla_flags
    if defaults is not None:
        env["RESFLAX_XLA_DEFAULTS"] = defaults
    res = subprocess.run([sys.executable, "-c", XLA_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["before"] == xla_flags and out["sum"] == 256 * 512
    return out


COMMAND_SCRIPT = textwrap.dedent("""
    import json, os, sys
    from resflax import cli
    cmd, workdir = sys.argv[1], sys.argv[2]
    rc = cli.main([cmd, f"--workdir={workdir}"] + (["photo.jpg"] if cmd == "predict" else []))  # an empty run dir
    import resflax.models  # noqa: F401  (configures XLA_FLAGS on import, unless the command already did)
    import jax, jax.numpy as jnp
    x = jnp.ones((256, 512), jnp.float32)
    ynn = jax.jit(lambda a: jnp.tanh(a) * a).lower(x).compile().as_text().count("__ynn_fusion")
    print(json.dumps({"rc": rc, "flags": os.environ.get("XLA_FLAGS"), "eltwise_ynn": ynn}))
""")


@pytest.mark.parametrize("cmd", ["predict", "eval"])
def test_predict_runs_without_the_training_flag(cmd, tmp_path):
    """The YNN flag is for training's step; ``resflax predict`` (one forward pass, slower with it on a CPU that
    gets it) starts JAX without it, while ``eval``, like training, gets resflax's defaults. Forced on (any CPU)
    so that the difference shows on every machine."""
    xla = _tested_jaxlib()
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "RESFLAX_XLA_DEFAULTS")}
    env.update(JAX_PLATFORMS="cpu", RESFLAX_XLA_DEFAULTS="force", RESFLAX_COMPILATION_CACHE="0")
    res = subprocess.run([sys.executable, "-c", COMMAND_SCRIPT, cmd, str(tmp_path)], env=env, capture_output=True,
                         text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["rc"] == 2, res.stderr[-2000:]  # no run there: one line, bad input
    if cmd == "predict":
        assert out["flags"] is None and out["eltwise_ynn"] == 0, out
    else:
        assert out["flags"] == " ".join(xla.default_flags(cpu=frozenset())) and out["eltwise_ynn"] > 0, out


def _tested_jaxlib():
    from resflax import xla

    if not xla.default_flags(cpu=frozenset()):
        pytest.skip("the YNN flag is only set (and known to exist) for the tested jaxlib versions")
    return xla


def test_user_xla_flags_are_never_replaced():
    """The user's XLA_FLAGS mention the YNN flag with another value: they stay byte for byte what the user
    set, both of the user's flags take effect (3 devices; reductions no longer YNN fusions), nothing is added
    by later configure() calls."""
    _tested_jaxlib()
    user = "--xla_cpu_experimental_ynn_fusion_type=eltwise  --xla_force_host_platform_device_count=3"
    out = _xla_child(user, defaults="force")
    assert out["after_import"] == out["after"] == user
    assert out["again"] == [] and out["fresh"] == []
    assert out["devices"] == 3
    assert out["reduce_ynn"] == 0 and out["eltwise_ynn"] >= 1  # "eltwise", not resflax's "eltwise,reduce"


def test_default_xla_flag_added_once():
    """No user setting, tested jaxlib: the flag is appended exactly once, and is what XLA runs with; calling
    configure() again (remembering the first call or not) adds nothing. User flags without it are kept as
    they were, in front."""
    xla = _tested_jaxlib()
    flag = f"{xla.YNN_FLAG}={xla.YNN_VALUE}"
    out = _xla_child(defaults="force")  # the flag on any CPU (this one may be where it is not set by default)
    assert out["after_import"] == out["after"] == flag
    assert out["again"] == [flag] and out["fresh"] == []
    assert out["reduce_ynn"] >= 1 and out["eltwise_ynn"] >= 1  # "eltwise,reduce" in effect
    assert out["devices"] == 1
    user = "--xla_force_host_platform_device_count=2"
    out = _xla_child(user, defaults="force")
    assert out["after"] == f"{user} {flag}" and out["after"].count(xla.YNN_FLAG) == 1
    assert out["devices"] == 2 and out["eltwise_ynn"] >= 1 and out["reduce_ynn"] >= 1


@pytest.mark.parametrize("user", [None, "--xla_force_host_platform_device_count=2"])
def test_xla_defaults_off_adds_nothing(user):
    out = _xla_child(user, defaults="0")
    assert out["after_import"] == out["after"] == user  # unset stays unset
    assert out["again"] == [] and out["fresh"] == []
    assert out["devices"] == (2 if user else 1)
    from resflax import xla

    if xla.default_flags():  # tested jaxlib: XLA's own default is in effect (elementwise ops not YNN fusions)
        assert out["eltwise_ynn"] == 0 and out["reduce_ynn"] >= 1
