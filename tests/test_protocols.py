"""The paper's ImageNet test protocols (``train.protocols``) against a plain per-crop loop written here from
their definitions: one crop (or one whole image) at a time through the network, softmax, averaged."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resflax.data import imagenet, imagenet_source, jpeg, tiny_imagenet
from resflax.models import get_model
from resflax.train import protocols

CFG = imagenet.Preprocess(size=64, eval_resize=72, scale_range=(72, 96))
SCALES = (64, 80)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    tiny_imagenet.write_tiny_dataset(str(d), num_classes=3, train_per_class=1, val_per_class=3)
    src = imagenet_source.open_source(tiny_imagenet.NAME, str(d))
    model = get_model("resnet18", num_classes=3)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)), train=False)
    # non-trivial BN statistics, so that eval-mode BN is not the identity
    variables = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.1 if "mean" in jax.tree_util.keystr(p) else x, variables)
    mean = np.random.default_rng(0).uniform(0.3, 0.6, (64, 64, 3)).astype(np.float32)
    return src.validation, model, variables, mean


_APPLY = {}


def _scores(model, variables, image_u8, mean):
    """One crop or view through the network (jitted per model; one compilation per shape)."""
    if model not in _APPLY:
        _APPLY[model] = jax.jit(lambda v, x: jax.nn.softmax(model.apply(v, x, train=False)[0]))
    x = image_u8[None].astype(np.float32) / 255 - mean
    return np.asarray(_APPLY[model](variables, x))


def _reference(protocol, source, model, variables, mean):
    """Averaged scores per image by a plain loop over crops or views."""
    out = []
    for i in range(len(source)):
        data = source[i]["image"]
        w, h = jpeg.image_size(data)
        views = []
        if protocol == "10crop":  # torchvision's Resize + TenCrop, from their definitions
            s = CFG.eval_resize
            rw, rh = (s, int(s * h / w)) if w <= h else (int(s * w / h), s)
            full = jpeg.decode_box(data, (0, 0, w, h), (rw, rh))
            for im in (full, full[:, ::-1]):
                for top, left in [(0, 0), (0, rw - 64), (rh - 64, 0), (rh - 64, rw - 64),
                                  (int(round((rh - 64) / 2.0)), int(round((rw - 64) / 2.0)))]:
                    views.append((im[top:top + 64, left:left + 64], mean))
        else:  # multiscale: whole image, shorter side s, longer side to a multiple of 32, and its mirror
            for short in SCALES:
                long = int(max(w, h) * short / min(w, h))
                long = max(32, 32 * round(long / 32))
                size = (short, long) if w <= h else (long, short)
                im = jpeg.decode_box(data, (0, 0, w, h), size)
                views += [(im, mean.mean((0, 1))), (im[:, ::-1], mean.mean((0, 1)))]
        out.append(np.mean([_scores(model, variables, v, m) for v, m in views], axis=0))
    return out


@pytest.mark.parametrize("protocol", ["10crop", "multiscale"])
def test_protocol_equals_a_per_crop_loop(setup, protocol):
    source, model, variables, mean = setup
    got = protocols.run(protocol, model, variables, source, mean, CFG, scales=SCALES, batch_images=4,
                        workers=2, keep_probs=True)
    want = _reference(protocol, source, model, variables, mean)
    assert got["count"] == len(source) == 9 and sorted(got["probs"]) == list(range(9))
    for i in range(9):
        np.testing.assert_allclose(got["probs"][i], want[i], rtol=1e-4, atol=1e-5)
    labels = [source[i]["label"] for i in range(9)]
    top1 = 100 * np.mean([np.argmax(p) != y for p, y in zip(want, labels)])
    assert got["top1_error"] == pytest.approx(top1)
    assert got["top5_error"] == 0.0  # 3 classes: every label is in the top 5


def test_center_protocol_is_the_training_evaluation_crop(setup):
    source, model, variables, mean = setup
    got = protocols.run("center", model, variables, source, mean, CFG, keep_probs=True)
    for i in range(len(source)):
        crop = imagenet.eval_crop(source[i]["image"], CFG)
        np.testing.assert_allclose(got["probs"][i], _scores(model, variables, crop, mean), rtol=1e-4, atol=1e-5)


def test_ten_crop_windows():
    assert imagenet.five_crop_offsets(256, 341, 224) == [(0, 0), (0, 117), (32, 0), (32, 117), (16, 58)]
    with pytest.raises(ValueError, match="protocol must be"):
        protocols.run("5crop", None, None, [], None, CFG)
