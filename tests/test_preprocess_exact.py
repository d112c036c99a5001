"""Evaluation preprocessing is pixel-identical to the weights' own pipelines, checked against the real
torchvision transforms (``Resize(256)``, ``CenterCrop(224)``, ``TenCrop(224)`` on the PIL image that
``Image.open(f).convert("RGB")`` gives, as torchvision's reference scripts and ``ImageFolder`` load it) and
timm's ``create_transform(**resolve_data_config(...))`` eval transform, on real photographs of many sizes,
aspect ratios and image modes."""

import io

import numpy as np
import pytest
import skimage.data as skdata
from PIL import Image

from resflax.data import imagenet, jpeg

upstream = pytest.importorskip("upstream")


def _encode(im: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _photo(rgb: np.ndarray, size: tuple[int, int]) -> Image.Image:
    return Image.fromarray(rgb).resize(size, Image.Resampling.LANCZOS)


# (width, height): ImageNet-typical, odd sizes, tall and wide, shorter side >= 512 (where libjpeg's draft
# used to act), the 1000x872 photo whose long side torchvision truncates, and ones no larger than the resize
SIZES = [(500, 375), (375, 500), (333, 499), (1000, 872), (640, 512), (1200, 800), (801, 1203), (2048, 513),
         (257, 900), (256, 256), (300, 227), (199, 150)]


def _jpegs():
    photos = [skdata.coffee(), skdata.chelsea(), skdata.astronaut(), skdata.rocket()]
    return [(f"{w}x{h}", _encode(_photo(photos[i % len(photos)], (w, h)), quality=90))
            for i, (w, h) in enumerate(SIZES)]


def _modes():
    """Stored images of other modes: palette (PNG and GIF), greyscale JPEG, LA, RGBA, 16-bit greyscale, CMYK
    JPEG; the brighter astronaut so that 16-bit values cover the range."""
    base = _photo(skdata.astronaut(), (517, 389))
    grey16 = Image.fromarray((np.asarray(base.convert("L"), np.uint16) * 257).astype(np.uint16))
    la = base.convert("LA")
    rgba = base.convert("RGBA")
    rgba.putalpha(Image.fromarray(np.tile(np.linspace(0, 255, 517, dtype=np.uint8), (389, 1))))
    return [("P png", _encode(base.convert("P", palette=Image.Palette.ADAPTIVE), "PNG")),
            ("P gif", _encode(base.convert("P"), "GIF")),
            ("L jpeg", _encode(base.convert("L"), quality=90)),
            ("LA png", _encode(la, "PNG")), ("RGBA png", _encode(rgba, "PNG")),
            ("I;16 png", _encode(grey16, "PNG")),
            ("CMYK jpeg", _encode(base.convert("CMYK"), quality=90))]


def _cases():
    return _jpegs() + _modes()


def _loaded(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def test_the_cases_are_what_they_claim():
    modes = {name: Image.open(io.BytesIO(data)).mode for name, data in _modes()}
    assert modes == {"P png": "P", "P gif": "P", "L jpeg": "L", "LA png": "LA", "RGBA png": "RGBA",
                     "I;16 png": "I;16", "CMYK jpeg": "CMYK"}
    assert [jpeg.image_size(d) for _, d in _jpegs()] == SIZES


@pytest.mark.parametrize("name,data", _cases(), ids=[n for n, _ in _cases()])
def test_eval_crop_is_torchvisions_resize_and_center_crop(name, data):
    tv = upstream.import_torchvision()
    t = tv.transforms
    want = np.asarray(t.Compose([t.Resize(256), t.CenterCrop(224)])(_loaded(data)))
    got = imagenet.eval_crop(data, imagenet.Preprocess())
    assert got.shape == want.shape == (224, 224, 3)
    np.testing.assert_array_equal(got, want)
    # the resize alone, and another size pair
    np.testing.assert_array_equal(jpeg.decode_resized(data, 256), np.asarray(t.Resize(256)(_loaded(data))))
    small = imagenet.Preprocess(size=112, eval_resize=128, scale_range=(128, 240))
    np.testing.assert_array_equal(imagenet.eval_crop(data, small),
                                  np.asarray(t.Compose([t.Resize(128), t.CenterCrop(112)])(_loaded(data))))


@pytest.mark.parametrize("name,data", _jpegs()[:6], ids=[n for n, _ in _jpegs()[:6]])
def test_ten_crops_are_torchvisions_ten_crop(name, data):
    t = upstream.import_torchvision().transforms
    want = np.stack([np.asarray(c) for c in t.Compose([t.Resize(256), t.TenCrop(224)])(_loaded(data))])
    np.testing.assert_array_equal(imagenet.ten_crops(data, imagenet.Preprocess()), want)


@pytest.mark.parametrize("pretrained", [
    dict(interpolation="bicubic", crop_pct=0.95),  # timm's ResNet a1/a2 recipes
    dict(interpolation="bilinear", crop_pct=0.875),  # timm's defaults for torchvision's weights
    dict(interpolation="bicubic", crop_pct=0.9, input_size=(3, 160, 160)),
])
def test_timm_settings_reach_the_pixels(pretrained):
    """timm's own eval transform (``create_transform(**resolve_data_config(pretrained_cfg=...))``) against the
    Preprocess that ``transfer.timm_preprocessing`` makes of the same pretrained config, up to the float
    input: identical uint8 crops, so identical floats once both normalise."""
    timm = upstream.import_timm()
    from timm.data import create_transform, resolve_data_config  # noqa: PLC0415

    from resflax.train import tasks, transfer  # noqa: PLC0415

    cfg = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), **pretrained}
    data_config = resolve_data_config(pretrained_cfg=cfg)
    tf = create_transform(**data_config, is_training=False)
    settings = transfer.timm_preprocessing(cfg)
    prep = tasks.preprocess(_config(settings))
    assert (prep.resample, prep.size) == (cfg["interpolation"], cfg.get("input_size", (3, 224))[1])
    for name, data in _cases()[::2]:
        want = tf(_loaded(data)).numpy().transpose(1, 2, 0)  # normalised float, CHW -> HWC
        crop = imagenet.eval_crop(data, prep)
        got = (crop.astype(np.float32) / 255 - np.float32(settings["channel_mean"])) / np.float32(settings["std"])
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6, err_msg=name)
        # the uint8 crop itself: timm's transform without its ToTensor/Normalize
        pil = timm.data.transforms_factory.transforms.Compose(tf.transforms[:-2])(_loaded(data))
        np.testing.assert_array_equal(crop, np.asarray(pil), err_msg=name)


def _config(settings: dict):
    from resflax import configs  # noqa: PLC0415

    return configs.build("imagenet", **settings)


@pytest.mark.parametrize("weights,resize", [("ResNet18_Weights.IMAGENET1K_V1", 256),
                                            ("ResNet50_Weights.IMAGENET1K_V2", 232)])
def test_torchvisions_weights_own_transforms(weights, resize):
    """The ``transforms()`` preset torchvision's weights carry (ImageClassification: resize, centre crop,
    normalise) equals the settings an import records (``transfer.SOURCES``; V2 weights with eval_resize=232)."""
    upstream.import_torchvision()
    import torchvision.models as tvm  # noqa: PLC0415

    from resflax.train import tasks, transfer  # noqa: PLC0415

    enum, member = weights.split(".")
    preset = getattr(getattr(tvm, enum), member).transforms()
    settings = {**transfer.SOURCES["torchvision"], "eval_resize": resize}
    prep = tasks.preprocess(_config(settings))
    for name, data in _cases()[::3]:
        want = preset(_loaded(data)).numpy().transpose(1, 2, 0)
        crop = imagenet.eval_crop(data, prep)
        got = (crop.astype(np.float32) / 255 - np.float32(settings["channel_mean"])) / np.float32(settings["std"])
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6, err_msg=name)
