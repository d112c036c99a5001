"""ImageNet host preprocessing on real photographs (scikit-image's samples encoded as ImageNet-sized JPEGs):
decoding, the paper's augmentation op by op, the mean, the stream of examples, and the grain pipeline."""

import contextlib
import io

import numpy as np
import pytest
import skimage.data as skdata
from PIL import Image

from resflax.data import imagenet, imagenet_input, jpeg, sharding
from resflax.errors import DataError


def _encode(rgb: np.ndarray, size=None, quality=90, fmt="JPEG") -> bytes:
    im = Image.fromarray(rgb)
    if size is not None:
        im = im.resize(size, Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, fmt, quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photos():
    """ImageNet-typical 500×375 (and one 375×500) JPEGs at quality 90."""
    return [_encode(skdata.coffee(), (500, 375)), _encode(skdata.chelsea(), (500, 375)),
            _encode(skdata.rocket(), (500, 375)), _encode(skdata.astronaut(), (375, 500)),
            _encode(skdata.stereo_motorcycle()[0], (500, 375))]


@pytest.fixture(scope="module")
def large_photos():
    """Photos at their stored size, large enough for the decoder to downscale before a 256 resize."""
    return [_encode(skdata.astronaut()), _encode(skdata.hubble_deep_field()), _encode(skdata.retina()),
            _encode(skdata.coffee(), (1200, 800))]


def _source(photos, n):
    return [{"image": photos[i % len(photos)], "label": i % 7} for i in range(n)]


# ---- decoding ---------------------------------------------------------------------------------------------


def test_resizing_only_the_box_equals_resize_then_crop(photos):
    for data in photos:
        w, h = jpeg.image_size(data)
        full = jpeg.decode_resized(data, 300).astype(int)
        rw, rh = jpeg.resized_size(w, h, 300)
        assert full.shape == (rh, rw, 3) and min(rw, rh) == 300
        top, left = 17, rw - 224 - 5
        box = (left * w / rw, top * h / rh, (left + 224) * w / rw, (top + 224) * h / rh)
        crop = jpeg.decode_box(data, box, (224, 224)).astype(int)
        diff = np.abs(crop - full[top:top + 224, left:left + 224])
        assert diff.max() <= 1 and diff.mean() < 0.05  # rounding of the same filter, nothing more


def test_draft_downscales_in_the_dct_domain_only_at_half_size_or_less():
    data = _encode(skdata.coffee(), (500, 375))
    for need, factor in [((250, 188), 1.0), ((250, 187), 2.0), ((100, 75), 4.0), ((62, 46), 8.0)]:
        im = jpeg.open_image(data)
        assert jpeg._draft(im, need) == factor
        assert im.size == (-(-500 // int(factor)), -(-375 // int(factor)))
    png = _encode(skdata.coffee(), fmt="PNG")
    assert jpeg._draft(jpeg.open_image(png), (10, 10)) == 1.0


def _draft_factor(data, box, out):
    """The factor libjpeg decodes at when a training crop of ``box`` to ``out`` drafts."""
    im = jpeg.open_image(data)
    w, h = im.size
    need = (-(-2 * w * out[0] // (box[2] - box[0])), -(-2 * h * out[1] // (box[3] - box[1])))
    return jpeg._draft(im, need)


def test_training_draft_leaves_the_last_2x_to_pillow_and_stays_close_to_the_full_decode(large_photos):
    """Draft decoding is for training crops only, and asks libjpeg for at least twice the crop's scale: what
    remains against the full decode is JPEG's DCT-domain scaling, measured here (data/jpeg.py's docstring)."""
    cfg = imagenet.Preprocess(scale_range=(224, 256))  # small scales: the decoder reduces on every large photo
    diffs = []
    for i, data in enumerate(large_photos * 4):
        w, h = jpeg.image_size(data)
        p = imagenet.train_params(imagenet.example_rng(0, 0, i), w, h, cfg)
        factor = _draft_factor(data, p.box, (224, 224))
        if factor == 1.0:  # a photo too small for this crop to draft
            continue
        scale = (p.box[2] - p.box[0]) / 224  # stored pixels per output pixel
        assert scale / factor >= 2.0  # Pillow's antialiased resize still reduces by 2x or more
        fast = jpeg.decode_box(data, p.box, (224, 224), draft=True).astype(float)
        full = jpeg.decode_box(data, p.box, (224, 224), draft=False).astype(float)
        diffs.append(np.abs(fast - full))
    assert len(diffs) >= 4  # the fast path is really taken
    assert max(d.mean() for d in diffs) < 0.5, [d.mean() for d in diffs]  # measured: 0.17-0.29/255
    # evaluation never drafts: the setting does not change its pixels
    for data in large_photos:
        np.testing.assert_array_equal(imagenet.eval_crop(data, imagenet.Preprocess(draft=True)),
                                      imagenet.eval_crop(data, imagenet.Preprocess(draft=False)))


def test_greyscale_and_png_files_decode_to_rgb(photos):
    grey = _encode(np.asarray(Image.open(io.BytesIO(photos[0])).convert("L")))
    png = _encode(skdata.chelsea(), fmt="PNG")
    for data in (grey, png):
        out = imagenet.train_example(data, imagenet.channel_mean(), 0, 0, 0)
        assert out.shape == (224, 224, 3) and out.dtype == np.float32
    g = imagenet.eval_crop(grey)
    assert np.array_equal(g[..., 0], g[..., 1]) and np.array_equal(g[..., 0], g[..., 2])


def test_box_outside_the_image_is_refused(photos):
    with pytest.raises(ValueError, match="not inside"):
        jpeg.decode_box(photos[0], (0, 0, 501, 100), (224, 224))


# ---- the paper's augmentation -----------------------------------------------------------------------------


def _params(n, width=500, height=375, cfg=imagenet.DEFAULT, seed=0, epoch=0):
    return [imagenet.train_params(imagenet.example_rng(seed, epoch, i), width, height, cfg) for i in range(n)]


def test_scale_is_uniform_over_256_to_480_and_sets_the_crop_size():
    ps = _params(5000)
    scales = np.array([p.scale for p in ps])
    assert scales.min() >= 256 and scales.max() <= 480
    assert scales.min() == 256 and scales.max() == 480  # both ends drawn (each has 5000 chances in 225)
    hist = np.histogram(scales, bins=9, range=(256, 481))[0] / len(scales)
    assert np.all(np.abs(hist - 1 / 9) < 0.03), hist
    for p in ps[:200]:  # a 224 crop of a shorter side S covers 224 * 375 / S stored pixels of the short axis
        left, top, right, bottom = p.box
        assert bottom - top == pytest.approx(224 * 375 / p.scale, rel=1e-9)
        assert right - left == pytest.approx(224 * 375 / p.scale, rel=0.01)  # long side rounded to pixels


@pytest.mark.parametrize("crop", ["scale", "inception"])
@pytest.mark.parametrize("size", [(500, 375), (375, 500), (1000, 120), (231, 640), (224, 224)])
def test_crop_boxes_stay_inside_the_image_and_reach_its_edges(crop, size):
    w, h = size
    boxes = np.array([p.box for p in _params(2000, w, h, imagenet.Preprocess(crop=crop))])
    assert np.all(boxes[:, 0] >= 0) and np.all(boxes[:, 1] >= 0)
    assert np.all(boxes[:, 2] <= w) and np.all(boxes[:, 3] <= h)
    assert np.all(boxes[:, 2] > boxes[:, 0]) and np.all(boxes[:, 3] > boxes[:, 1])
    assert boxes[:, 0].min() < 0.02 * w and boxes[:, 2].max() > 0.98 * w  # left and right edges both cropped


def test_inception_crop_area_and_aspect():
    boxes = np.array([p.box for p in _params(3000, cfg=imagenet.Preprocess(crop="inception"))])
    bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    area = bw * bh / (500 * 375)
    assert area.min() >= 0.075 and area.max() <= 1.0 and area.min() < 0.1 and area.max() > 0.9
    ok = (bw / bh >= 0.74) & (bw / bh <= 1.35)
    assert ok.mean() > 0.99  # the rest: the centre-crop fallback after 10 misses (aspect clamped too)
    fallback = imagenet.inception_crop_box(np.random.default_rng(0), 1000, 100, (0.9, 1.0), (3 / 4, 4 / 3))
    assert fallback == (433, 0, 566, 100)  # too wide for any window: centre crop, width round(100 * 4/3)


def test_outputs_are_224_float32_and_flip_really_mirrors(photos):
    mean = imagenet.channel_mean()
    no_flip = imagenet.Preprocess(flip=False)
    flips = [p.flip for p in _params(2000)]
    assert 0.45 < np.mean(flips) < 0.55
    flipped = [i for i in range(20) if flips[i]][:3]
    for data in photos:
        for i in flipped:
            a = imagenet.train_example(data, mean, 0, 0, i)
            b = imagenet.train_example(data, mean, 0, 0, i, no_flip)
            assert a.shape == (224, 224, 3) and a.dtype == np.float32
            assert np.array_equal(a, b[:, ::-1]) and not np.array_equal(a, b)


def test_mean_is_subtracted_exactly_and_not_mirrored(photos):
    mean = np.random.default_rng(0).random((224, 224, 3), dtype=np.float32)
    crop = imagenet.eval_crop(photos[1])
    np.testing.assert_allclose(imagenet.eval_example(photos[1], mean), crop / 255.0 - mean, atol=1e-6)
    channel = imagenet.channel_mean()
    np.testing.assert_allclose(imagenet.eval_example(photos[1], channel), crop / 255.0 - channel, atol=1e-6)
    offset = np.array([0.1, -0.2, 0.3], np.float32)
    np.testing.assert_allclose(imagenet.finish(crop, mean, offset), crop / 255.0 - mean + offset, atol=1e-6)
    i = next(i for i, p in enumerate(_params(20)) if p.flip)
    a = imagenet.train_example(photos[1], mean, 0, 0, i, imagenet.Preprocess(lighting_std=0))
    b = imagenet.train_example(photos[1], mean, 0, 0, i, imagenet.Preprocess(lighting_std=0, flip=False))
    np.testing.assert_allclose(a + mean, (b + mean)[:, ::-1], atol=1e-6)  # the mean is applied after the flip


def test_lighting_covariance_is_eigvec_diag_of_scaled_eigval_squared():
    np.testing.assert_allclose(imagenet.EIGVEC.T @ imagenet.EIGVEC, np.eye(3), atol=2e-3)  # columns: eigvecs
    n = 12000
    offsets = np.array([imagenet.lighting_offset(p.alpha) for p in _params(n)])
    want = imagenet.EIGVEC @ np.diag((0.1 * imagenet.EIGVAL) ** 2) @ imagenet.EIGVEC.T
    got = np.cov(offsets.T)
    # Standard error of a sample covariance of Gaussians: sqrt((S_ii S_jj + S_ij^2) / n); allow 5 of them.
    tol = 5 * np.sqrt((np.outer(np.diag(want), np.diag(want)) + want**2) / n)
    assert np.all(np.abs(got - want) < tol), (got, want)
    # Scale: [0, 1] pixel units, so the main component's std is 0.1 * 0.2175 (≈ 5.5 grey levels).
    assert np.sqrt(np.linalg.eigvalsh(got).max()) == pytest.approx(0.02175, rel=0.05)


def test_lighting_adds_the_drawn_offset_to_every_pixel(photos):
    mean = imagenet.channel_mean()
    for i in range(3):
        lit = imagenet.train_example(photos[2], mean, 5, 1, i)
        dark = imagenet.train_example(photos[2], mean, 5, 1, i, imagenet.Preprocess(lighting_std=0.0))
        p = _params(i + 1, seed=5, epoch=1)[i]
        offset = imagenet.lighting_offset(p.alpha)
        np.testing.assert_allclose(lit - dark, np.broadcast_to(offset, lit.shape), atol=1e-6)
        assert np.abs(offset).max() > 1e-4


def test_augmentation_depends_only_on_seed_epoch_and_index(photos):
    mean = imagenet.channel_mean()
    keys = [(0, 0, i) for i in range(6)] + [(0, 1, 0), (1, 0, 0)]
    first = {k: imagenet.train_example(photos[k[2] % 5], mean, *k) for k in keys}
    again = {k: imagenet.train_example(photos[k[2] % 5], mean, *k) for k in reversed(keys)}
    assert all(np.array_equal(first[k], again[k]) for k in keys)
    assert not np.array_equal(first[(0, 0, 0)], first[(0, 1, 0)])  # another epoch, another draw
    assert not np.array_equal(first[(0, 0, 0)], first[(1, 0, 0)])  # another seed too


# ---- the mean ---------------------------------------------------------------------------------------------


def test_mean_is_computed_once_then_read_from_its_cache(photos, tmp_path):
    calls = []

    def images():
        calls.append(1)
        return iter(photos)

    path = imagenet.mean_cache_path(tmp_path / "cache", "imagenet2012", "5.1.0", len(photos))
    assert path != imagenet.mean_cache_path(tmp_path / "cache", "imagenet2012", "5.0.0", len(photos))
    assert path != imagenet.mean_cache_path(tmp_path / "cache", "imagenet2012", "5.1.0", 7)
    mean = imagenet.load_or_compute_mean(path, images)
    want = np.mean([imagenet.eval_crop(d) / 255.0 for d in photos], axis=0)
    assert mean.shape == (224, 224, 3) and mean.dtype == np.float32
    np.testing.assert_allclose(mean, want, atol=1e-6)
    assert path.exists() and [p.name for p in path.parent.iterdir()] == [path.name]  # no temp files left
    np.testing.assert_array_equal(imagenet.load_or_compute_mean(path, images), mean)
    assert calls == [1]
    path.write_bytes(b"not an array")
    with pytest.raises(DataError, match="delete it"):
        imagenet.load_or_compute_mean(path, images)


def test_mean_sample_spreads_over_the_source(photos):
    src = _source(photos, 100)
    sample = list(imagenet.sample_images(src, 5))
    assert sample == [src[i]["image"] for i in (0, 25, 50, 74, 99)]
    assert imagenet.channel_mean().shape == (3,)


# ---- which examples each process reads --------------------------------------------------------------------


@pytest.mark.parametrize("num_examples,global_batch", [(12, 6), (10, 6), (7, 3)])
def test_every_example_is_read_once_per_epoch_across_processes(num_examples, global_batch):
    for processes in (1, 2, 3):
        if global_batch % processes:
            continue
        streams = [sharding.Stream(num_examples, global_batch, 0, p, processes) for p in range(processes)]
        orders = []
        for epoch in range(4):
            order = []
            for step in range(streams[0].first_step(epoch), streams[0].first_step(epoch + 1) + 1):
                for s in streams:  # process order within a step = the global batch's order
                    reads = s.epoch_reads(epoch).get(step)
                    order += [] if reads is None else list(reads)
            assert sorted(order) == list(range(num_examples)), (processes, epoch)
            orders.append(order)
        assert len({tuple(o) for o in orders}) == 4  # a new permutation every epoch
        for step in range(8):  # the global batch of a step does not depend on the process count
            one = sharding.Stream(num_examples, global_batch, 0).step_examples(step)
            split = [s.step_examples(step) for s in streams]
            assert np.array_equal(np.concatenate([e for e, _ in split]), one[0])
            assert np.array_equal(np.concatenate([i for _, i in split]), one[1])


def test_stream_refuses_batches_that_do_not_split():
    with pytest.raises(ValueError, match="divisible"):
        sharding.Stream(100, 10, 0, 0, 3)
    with pytest.raises(ValueError, match="process_index"):
        sharding.Stream(100, 10, 0, 2, 2)


def test_eval_reads_every_example_once_and_masks_the_padding():
    for processes in (1, 2):
        seen = []
        for step in range(sharding.eval_steps(10, 4)):
            for p in range(processes):
                idx, mask = sharding.eval_examples(step, 10, 4, p, processes)
                seen += list(idx[mask])
                assert np.all(idx[~mask] == 0)
        assert sorted(seen) == list(range(10))


# ---- the grain pipeline -----------------------------------------------------------------------------------

MEAN = imagenet.channel_mean()


def _finished(batches):
    """Each training batch as the model sees it (numpy ``finish_batch``), copied out of shared memory."""
    return [imagenet.finish_batch(b["image"], MEAN, b["lighting"]) for b in batches]


def _same(xs, ys):
    return len(xs) == len(ys) and all(np.array_equal(x, y) for x, y in zip(xs, ys))


def test_grain_batches_equal_the_bare_loop_and_resume_from_a_step(photos):
    src = _source(photos, 10)
    stream = sharding.Stream(len(src), 4, seed=3, process_index=1, process_count=2)
    ds = imagenet_input.train_dataset(src, stream, num_steps=7)
    with contextlib.closing(imagenet_input.loader(ds, read_threads=2)) as it:
        batches = list(it)
    assert batches[0]["image"].shape == (2, 224, 224, 3) and batches[0]["image"].dtype == np.uint8
    assert batches[0]["lighting"].shape == (2, 3) and batches[0]["label"].dtype == np.int32
    assert _same(_finished(batches), _finished(imagenet_input.bare_train_batches(src, stream, num_steps=7)))
    epochs, indices = stream.step_examples(5)
    assert batches[5]["label"].tolist() == [src[i]["label"] for i in indices]
    want = imagenet.train_example(src[indices[1]]["image"], MEAN, 3, int(epochs[1]), int(indices[1]))
    np.testing.assert_allclose(_finished(batches)[5][1], want, atol=1e-6)
    resumed = imagenet_input.train_dataset(src, stream, num_steps=3, start_step=4)
    with contextlib.closing(imagenet_input.loader(resumed)) as it:
        assert _same(_finished(it), _finished(batches[4:]))


def test_finish_batch_on_the_device_matches_the_host(photos):
    import jax
    import jax.numpy as jnp

    crops, offsets = zip(*(imagenet.train_crop(d, 0, 0, i) for i, d in enumerate(photos)))
    mean = np.random.default_rng(1).random((224, 224, 3), dtype=np.float32)
    host = np.stack([imagenet.train_example(d, mean, 0, 0, i) for i, d in enumerate(photos)])
    device = jax.jit(lambda x, o, m: imagenet.finish_batch(x, m, o, xp=jnp))(np.stack(crops), np.stack(offsets),
                                                                            mean)
    assert device.dtype == jnp.float32 and device.shape == host.shape
    np.testing.assert_allclose(np.asarray(device), host, atol=1e-6)
    evals = np.stack([imagenet.eval_crop(d) for d in photos])
    np.testing.assert_allclose(imagenet.finish_batch(evals, mean),
                               np.stack([imagenet.eval_example(d, mean) for d in photos]), atol=1e-6)


def test_eval_dataset_pads_and_masks(photos):
    src = _source(photos, 5)
    ds = imagenet_input.eval_dataset(src, global_batch=4, process_index=1, process_count=2)
    batches = list(ds)
    assert [b["mask"].tolist() for b in batches] == [[True, True], [False, False]]
    assert batches[0]["label"].tolist() == [2, 3]
    np.testing.assert_array_equal(batches[0]["image"][0], imagenet.eval_crop(src[2]["image"]))


@pytest.mark.slow
def test_worker_processes_change_nothing_and_grain_state_restores(photos):
    src = _source(photos, 9)
    stream = sharding.Stream(len(src), 2, seed=1)
    ds = imagenet_input.train_dataset(src, stream, num_steps=6)
    with contextlib.closing(imagenet_input.loader(ds)) as it:
        serial = _finished(it)
    with contextlib.closing(imagenet_input.loader(ds, workers=2)) as it:
        parallel = _finished([next(it) for _ in range(2)])
        state = it.get_state()
        parallel += _finished(it)
        it.set_state(state)  # back to step 2
        replay = _finished(it)
    assert _same(serial, parallel) and _same(serial[2:], replay)
    assert _same(serial, _finished(imagenet_input.bare_train_batches(src, stream, num_steps=6, workers=2)))
