"""Weights in and out with exact parity: PyTorch networks in torchvision's and akamaster's layouts
(``torch_nets``, randomly initialised, eval mode) imported into resflax give the same logits on real
photographs; resflax weights exported load into PyTorch with ``strict=True`` and give them back; import ->
export -> import is bit-exact."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data as skdata
from PIL import Image

from resflax import weights
from resflax.errors import BadInput, DataError
from resflax.models import get_model

torch = pytest.importorskip("torch")
torch_nets = pytest.importorskip("torch_nets")

MEAN, STD = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)


def _photos(size: int) -> np.ndarray:
    """Real photographs, normalised as torchvision's weights expect: NHWC float32."""
    ims = [skdata.coffee(), skdata.chelsea(), skdata.astronaut()]
    x = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.Resampling.BILINEAR)) for im in ims])
    return (x.astype(np.float32) / 255 - MEAN) / STD


def _torch_logits(net, x):
    with torch.no_grad():
        return net(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()


def _state(net):
    return {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}


CASES = {
    # 160 px: real photographs at a size that keeps the CPU test short; the layouts do not depend on it (VGG's
    # adaptive pool still makes the 7x7x512 features whose CHW/HWC order classifier.0 must get right)
    "resnet18": (lambda: torch_nets.ResNet(torch_nets.Basic, (2, 2, 2, 2)), dict(), "torchvision", 160),
    "resnet50": (lambda: torch_nets.ResNet(torch_nets.Bottleneck, (3, 4, 6, 3)), dict(stride_on_3x3=True),
                 "torchvision", 160),
    "vgg16": (lambda: torch_nets.VGG(), dict(), "torchvision", 160),
    "resnet20": (lambda: torch_nets.DataParallelLike(torch_nets.CifarResNet(3)), dict(pad_layout="split"), "cifar",
                 32),
}


@pytest.mark.parametrize("name", list(CASES))
def test_import_gives_pytorchs_logits_and_export_gives_them_back(name):
    make, overrides, layout, size = CASES[name]
    torch.manual_seed(0)
    net = torch_nets.randomize_bn(make())
    x = _photos(size)
    want = _torch_logits(net, x)
    model = get_model(name, impl="flax", **overrides) if name != "vgg16" else get_model(name)
    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)), train=False))
    state = _state(net)
    weights.check_variant(state, model, layout)
    variables = weights.from_torch(state, model, abstract, layout)
    got = np.asarray(model.apply(variables, x, train=False))
    assert np.abs(got - want).max() <= 1e-4, np.abs(got - want).max()
    # out: PyTorch loads the export strictly and computes the same logits; round trip bit-exact
    out = weights.to_torch(variables, model, layout)
    net2 = torch_nets.randomize_bn(make(), seed=1)
    net2.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in out.items()}, strict=True)
    np.testing.assert_array_equal(_torch_logits(net2, x), want)
    again = weights.from_torch(out, model, abstract, layout)
    for a, b in zip(jax.tree_util.tree_leaves(variables), jax.tree_util.tree_leaves(again)):
        np.testing.assert_array_equal(a, b)


def test_mismatches_are_refused(tmp_path):
    torch.manual_seed(0)
    state = _state(torch_nets.ResNet(torch_nets.Bottleneck, (3, 4, 6, 3)))
    v1 = get_model("resnet50")
    with pytest.raises(BadInput, match="v1.5"):
        weights.check_variant(state, v1, "torchvision")
    r101 = get_model("resnet101", stride_on_3x3=True)
    abstract = jax.eval_shape(lambda: r101.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)), train=False))
    with pytest.raises(BadInput, match="missing"):
        weights.from_torch(state, r101, abstract, "torchvision")
    r50 = get_model("resnet50", stride_on_3x3=True, num_classes=10)
    abstract = jax.eval_shape(lambda: r50.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)), train=False))
    with pytest.raises(BadInput, match="shape"):
        weights.from_torch(state, r50, abstract, "torchvision")
    with pytest.raises(BadInput, match="split"):
        weights.check_variant({}, get_model("resnet20"), "cifar")


def test_files_safetensors_and_restricted_pickles(tmp_path):
    torch.manual_seed(0)
    net = torch_nets.DataParallelLike(torch_nets.CifarResNet(3))
    state = _state(net)
    weights.write_state_dict(state, tmp_path / "w.safetensors")
    back = weights.read_state_dict(tmp_path / "w.safetensors")
    assert sorted(back) == sorted(state) and all(np.array_equal(back[k], state[k]) for k in state)
    # akamaster's .th: {"state_dict": ..., "best_prec1": ...}, read with the restricted unpickler
    torch.save({"state_dict": net.state_dict(), "best_prec1": 91.2}, tmp_path / "model.th")
    th = weights.read_state_dict(tmp_path / "model.th")
    assert sorted(th) == sorted(state)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"state_dict": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(DataError, match="contains Python objects other than tensors"):
        weights.read_state_dict(tmp_path / "evil.pth")
    (tmp_path / "bad.safetensors").write_bytes(b"nope")
    with pytest.raises(DataError, match="not a readable safetensors"):
        weights.read_state_dict(tmp_path / "bad.safetensors")


@pytest.mark.slow
def test_import_eval_predict_export_and_fine_tune_through_the_cli(tmp_path, capsys):
    """The README's four commands (import -> eval -> predict -> export), then `resflax train --workdir` fine-tunes
    the imported run with the settings the import recorded (torchvision's normalisation, v1.5, option B)."""
    from resflax import cli  # noqa: PLC0415
    from resflax.data import tiny_imagenet  # noqa: PLC0415

    data = tiny_imagenet.write_tiny_dataset(str(tmp_path / "data"))
    torch.manual_seed(0)
    net = torch_nets.randomize_bn(torch_nets.ResNet(torch_nets.Basic, (2, 2, 2, 2), num_classes=4))
    weights.write_state_dict(_state(net), tmp_path / "r18.safetensors")
    w = tmp_path / "run"
    common = ["--config=experiments/imagenet.py:tiny", f"--config.data_dir={data}",
              f"--config.mean_cache_dir={tmp_path / 'cache'}", "--config.num_steps=2", "--config.progress=False"]
    assert cli.main(["import", str(tmp_path / "r18.safetensors"), f"--workdir={w}", *common,
                     "--config.image_size=112", "--config.eval_resize=128"]) == 0  # CPU-sized, kept over 224/256
    cfg = json.loads((w / "config.json").read_text())
    assert (cfg["mean"], cfg["std"], cfg["stride_on_3x3"], cfg["shortcut"]) == ("channel", [0.229, 0.224, 0.225],
                                                                                True, "B")
    capsys.readouterr()
    # eval: the imported logits, with torchvision's preprocessing, on the 16 validation images
    assert cli.main(["eval", f"--workdir={w}", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    from resflax.data import imagenet, imagenet_source  # noqa: PLC0415

    src = imagenet_source.open_source(tiny_imagenet.NAME, data)

    crops = np.stack([imagenet.eval_crop(src.validation[i]["image"], imagenet.Preprocess(size=112, eval_resize=128))
                      for i in range(16)])
    x = (crops.astype(np.float32) / 255 - MEAN) / STD
    want = _torch_logits(net, x).argmax(-1)
    labels = np.array([src.validation[i]["label"] for i in range(16)])
    assert res["step"] == 0 and res["test_error"] == pytest.approx(100 * np.mean(want != labels))
    # predict: top-5 (here all 4) classes with their names
    Image.fromarray(skdata.coffee()).save(tmp_path / "coffee.jpg")
    assert cli.main(["predict", f"--workdir={w}", str(tmp_path / "coffee.jpg"), "--json"]) == 0
    pred = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {t["name"] for t in pred["top"]} == {"coffee", "cat", "rocket", "astronaut"}
    assert sum(t["probability"] for t in pred["top"]) == pytest.approx(1.0, abs=1e-5)
    # export: the same tensors back
    assert cli.main(["export", f"--workdir={w}", f"--out={tmp_path / 'out.safetensors'}"]) == 0
    a, b = weights.read_state_dict(tmp_path / "r18.safetensors"), weights.read_state_dict(tmp_path / "out.safetensors")
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a if "num_batches" not in k)
    # fine-tune: train continues the imported run from step 0 with its own config.json
    assert cli.main(["train", f"--workdir={w}"]) == 0
    assert "final test error" in capsys.readouterr().out
    assert sorted(int(p.name) for p in (w / "checkpoints").iterdir() if p.name.isdigit())[-1] == 2


def _json_line(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_import_records_the_sources_preprocessing_and_predict_names_classes(tmp_path, capsys):
    """torchvision's weights get torchvision's evaluation (bilinear, 256 -> 224), timm's get their pretrained
    config's (here bicubic, crop_pct 0.95: 235 -> 224) from its config.json or flags, a --config key given wins;
    ``predict`` then feeds those pixels and names ImageNet's classes in English, without the dataset."""
    from resflax import cli  # noqa: PLC0415
    from resflax.data import imagenet  # noqa: PLC0415

    torch.manual_seed(0)
    net = torch_nets.randomize_bn(torch_nets.ResNet(torch_nets.Basic, (2, 2, 2, 2)))  # 1000 classes
    weights.write_state_dict(_state(net), tmp_path / "r18.safetensors")
    hub = {"architecture": "resnet18", "pretrained_cfg": {
        "tag": "a1_in1k", "input_size": [3, 224, 224], "interpolation": "bicubic", "crop_pct": 0.95,
        "crop_mode": "center", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "num_classes": 1000}}
    (tmp_path / "config.json").write_text(json.dumps(hub))
    src = [str(tmp_path / "r18.safetensors"), "--model", "resnet18", f"--config.data_dir={tmp_path / 'none'}"]
    keys = ("resample", "eval_resize", "image_size", "mean", "channel_mean", "std")
    imagenet_norm = ("channel", [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])

    def imported(name, *flags):
        assert cli.main(["import", *src, f"--workdir={tmp_path / name}", *flags]) == 0
        cfg = json.loads((tmp_path / name / "config.json").read_text())
        return tuple(cfg[k] for k in keys)

    assert imported("tv") == ("bilinear", 256, 224, *imagenet_norm)
    assert imported("timm", f"--timm_config={tmp_path / 'config.json'}") == ("bicubic", 235, 224, *imagenet_norm)
    assert "timm's preprocessing" in capsys.readouterr().out
    assert imported("given", "--interpolation=bilinear", "--crop_pct=0.875", "--config.eval_resize=300",
                    "--config.channel_mean=0.5,0.5,0.5") == ("bilinear", 300, 224, "channel", [0.5] * 3,
                                                               [0.229, 0.224, 0.225])
    out = capsys.readouterr().out
    assert "kept from the command line: channel_mean=(0.5, 0.5, 0.5) (timm: (0.485, 0.456, 0.406)), eval_resize=300 " \
           "(timm: 256)" in out
    # predict: timm's pixels through the network, ImageNet's English names
    Image.fromarray(skdata.coffee()).save(tmp_path / "coffee.png")
    assert cli.main(["predict", f"--workdir={tmp_path / 'timm'}", str(tmp_path / "coffee.png"), "--json"]) == 0
    pred = _json_line(capsys.readouterr().out)
    crop = imagenet.eval_crop((tmp_path / "coffee.png").read_bytes(),
                              imagenet.Preprocess(resample="bicubic", eval_resize=235))
    probs = torch.softmax(torch.from_numpy(_torch_logits(net, ((crop / 255 - MEAN) / STD)[None].astype(
        np.float32))), -1).numpy()[0]
    names = imagenet.class_names()
    assert [t["class"] for t in pred["top"]] == list(np.argsort(-probs, kind="stable")[:5])
    np.testing.assert_allclose([t["probability"] for t in pred["top"]], np.sort(probs)[::-1][:5], rtol=1e-4)
    assert [t["name"] for t in pred["top"]] == [names[t["class"]] for t in pred["top"]] and names[0] == "tench"
    # a dataset without names says so; an experiment whose training scales start below the source's crop (the
    # CPU-sized tiny one: 128-240 for 112 px) gets them raised to it
    assert cli.main(["import", str(tmp_path / "r18.safetensors"), "--config=experiments/imagenet.py:tiny",
                     f"--config.data_dir={tmp_path / 'none'}", "--workdir", str(tmp_path / "other"),
                     "--config.dataset=my_photos"]) == 0
    cfg = json.loads((tmp_path / "other" / "config.json").read_text())
    assert (cfg["image_size"], cfg["eval_resize"], cfg["scale_range"]) == (224, 256, [224, 240])
    capsys.readouterr()
    assert cli.main(["predict", f"--workdir={tmp_path / 'other'}", str(tmp_path / "coffee.png")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 6 and all(line.strip().endswith(")") and "(no names for this dataset) (" in line
                                 for line in out[1:])


@pytest.mark.parametrize("flags,message", [
    (["--crop_pct=1.5"], "timm crop_pct must be in (0, 1], got 1.5"),
    (["--interpolation=area"], "timm interpolation 'area' is not one of"),
    (["--timm_config=missing.json"], "cannot read missing.json"),
])
def test_bad_timm_settings_are_one_line(tmp_path, capsys, monkeypatch, flags, message):
    from resflax import cli  # noqa: PLC0415

    monkeypatch.chdir(tmp_path)
    weights.write_state_dict(_state(torch_nets.ResNet(torch_nets.Basic, (2, 2, 2, 2))), tmp_path / "r18.safetensors")
    assert cli.main(["import", "r18.safetensors", "--model", "resnet18", "--workdir=w", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "w").exists()
