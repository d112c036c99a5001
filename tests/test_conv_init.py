"""The conv initialiser (issue 25 item 6): He et al.'s normal init with the fan-in by default (the forward
signal of "Delving deep into rectifiers", the paper's [13]), or ``conv_init="fan_out"`` (its backward signal),
the init of fb.resnet.torch and torchvision: layer by layer the spread of torchvision's own ResNet-50
(``kaiming_normal_(mode="fan_out", nonlinearity="relu")``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from resflax import configs, weights
from resflax.errors import BadInput
from resflax.train import build

torch = pytest.importorskip("torch")
upstream = pytest.importorskip("upstream")


def _convs(conv_init):
    """Each conv kernel of ResNet-50 built from an ImageNet config with ``conv_init``: {torchvision key: HWIO}."""
    config = configs.build("imagenet", model="resnet50", shortcut="B", stride_on_3x3=True, conv_init=conv_init)
    model = build.model_from_config(config)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)
    flat = traverse_util.flatten_dict(params, sep="/")
    return {theirs: np.asarray(flat[ours]) for ours, theirs, kind in weights.name_map(model, "torchvision")
            if kind == "conv" and ours in flat}


def test_fan_out_gives_torchvisions_spread_and_fan_in_stays_the_default():
    tv = upstream.import_torchvision()
    torch.manual_seed(0)
    theirs = {k: v.numpy() for k, v in tv.models.resnet50(weights=None).state_dict().items()}
    fan_out, fan_in = _convs("fan_out"), _convs(configs.KEYS["conv_init"].default)
    assert len(fan_out) == 53
    ratios = []
    for key, w in fan_out.items():
        t = theirs[key]  # OIHW
        assert t.shape == w.transpose(3, 2, 0, 1).shape, key
        h, k, _, out = w.shape
        want = np.sqrt(2.0 / (h * k * out))
        # ours and torchvision's: N(0, 2 / fan_out), up to sampling (>= 4096 draws a layer: ~1% of the std)
        assert abs(w.std() / want - 1) < 0.06 and abs(t.std() / want - 1) < 0.06, key
        ratios.append(w.std() / t.std())
        # the default: N(0, 2 / fan_in), which differs wherever a conv changes the channel count
        fi = fan_in[key]
        assert abs(fi.std() / np.sqrt(2.0 / (h * k * w.shape[2])) - 1) < 0.06, key
    assert abs(np.mean(ratios) - 1) < 0.01, np.mean(ratios)
    assert fan_in["layer1.0.conv3.weight"].std() / fan_out["layer1.0.conv3.weight"].std() == pytest.approx(2, rel=0.05)


def test_conv_init_is_checked():
    c = configs.build("imagenet", model="resnet18")
    c.conv_init = "xavier"
    with pytest.raises(BadInput, match="conv_init must be 'fan_in' or 'fan_out', got 'xavier'"):
        configs.validate(c)
