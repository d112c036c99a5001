"""v1 and v1.5, and the shortcut options, at import (issue 25 item 3), against the real torchvision: a file of
torchvision's names cannot say whether its bottlenecks stride on the first 1x1 (the paper's v1) or on the 3x3
(v1.5, torchvision's), so ``--config.stride_on_3x3=False`` is honoured (the logits of a v1 PyTorch network) and
the default stays v1.5 (torchvision's own); a shortcut option is honoured when the file holds its projections
(C: torchvision's blocks with a projection on every one) and refused in one line when it does not; akamaster's
names with option A's zero channels appended (``--config.pad_layout=append``) likewise."""

import json

import numpy as np
import pytest
import skimage.data as skdata
from PIL import Image

from resflax import cli, weights
from resflax.train import evaluate
from resflax.train.distributed import to_host

torch = pytest.importorskip("torch")
upstream = pytest.importorskip("upstream")

MEAN, STD = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
SIZE = 128  # real photographs at a size that keeps the CPU test short (the strides do not depend on it)


def _photos() -> np.ndarray:
    ims = [skdata.coffee(), skdata.chelsea(), skdata.astronaut(), skdata.rocket()]
    x = np.stack([np.asarray(Image.fromarray(im).resize((SIZE, SIZE), Image.Resampling.BILINEAR)) for im in ims])
    return (x.astype(np.float32) / 255 - MEAN) / STD


def _random_bn(net):
    """Non-trivial BN statistics and affine parameters (eval-mode BN is then not the identity)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return net.eval()


def _logits_torch(net, x):
    with torch.no_grad():
        return net(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()


def _logits_run(workdir, x):
    _, run, state = evaluate.restore(workdir, locate_data=False, purpose="compare")
    return np.asarray(run.model.apply(to_host({"params": state.params, "batch_stats": state.batch_stats}), x,
                                      train=False))


def _save(net, path):
    weights.write_state_dict({k: v.detach().numpy().copy() for k, v in net.state_dict().items()}, path)


def _import(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = cli.main(["import", *map(str, args)])
    out = capsys.readouterr()
    return rc, out.out, out.err.strip()


def test_v1_weights_under_torchvision_names_import_as_v1_and_the_default_stays_v15(tmp_path, capsys):
    tv = upstream.import_torchvision()
    torch.manual_seed(0)
    v15 = _random_bn(tv.models.resnet50(weights=None))
    v1 = _random_bn(tv.models.resnet50(weights=None))
    v1.load_state_dict(v15.state_dict())
    for layer in (v1.layer1, v1.layer2, v1.layer3, v1.layer4):  # v1: each stage's stride on its first 1x1
        layer[0].conv1.stride, layer[0].conv2.stride = layer[0].conv2.stride, (1, 1)
    assert v1.layer2[0].conv1.stride == (2, 2) and v15.layer2[0].conv2.stride == (2, 2)
    _save(v1, tmp_path / "r50.safetensors")  # the same tensors either way: the file cannot tell
    x = _photos()
    want_v1, want_v15 = _logits_torch(v1, x), _logits_torch(v15, x)
    assert np.abs(want_v1 - want_v15).max() > 1.0  # the stride's place changes the network

    rc, out, err = _import(capsys, tmp_path / "r50.safetensors", "--model", "resnet50", "--workdir",
                           tmp_path / "v1", "--config.stride_on_3x3=False")
    assert rc == 0, err
    got = _logits_run(tmp_path / "v1", x)
    assert np.abs(got - want_v1).max() <= 1e-4 * max(1.0, np.abs(want_v1).max()), np.abs(got - want_v1).max()
    cfg = json.loads((tmp_path / "v1" / "config.json").read_text())  # the run records what it is
    assert (cfg["stride_on_3x3"], cfg["shortcut"]) == (False, "B")
    assert "stride_on_3x3=False (as given)" in out

    rc, out, err = _import(capsys, tmp_path / "r50.safetensors", "--model", "resnet50", "--workdir",
                           tmp_path / "v15")
    assert rc == 0, err
    assert json.loads((tmp_path / "v15" / "config.json").read_text())["stride_on_3x3"] is True
    got = _logits_run(tmp_path / "v15", x)
    assert np.abs(got - want_v15).max() <= 1e-4 * max(1.0, np.abs(want_v15).max()), np.abs(got - want_v15).max()

    # export: torchvision's class would load a v1 run silently and compute other logits
    capsys.readouterr()
    assert cli.main(["export", f"--workdir={tmp_path / 'v1'}", f"--out={tmp_path / 'out.safetensors'}"]) == 2
    assert "v1.5" in capsys.readouterr().err and not (tmp_path / "out.safetensors").exists()


def test_a_shortcut_option_is_honoured_when_the_file_holds_it_and_refused_in_one_line_when_not(tmp_path, capsys):
    tv = upstream.import_torchvision()
    torch.manual_seed(0)
    b = _random_bn(tv.models.resnet18(weights=None))
    _save(b, tmp_path / "b.safetensors")
    for opt, how in (("A", "--config.shortcut=A"), ("C", "--config=experiments/imagenet.py:resnet18,shortcut=C")):
        args = [tmp_path / "b.safetensors", "--workdir", tmp_path / opt, how]
        rc, _, err = _import(capsys, *args, *(["--model", "resnet18"] if opt == "A" else []))
        assert rc == 2 and len(err.splitlines()) == 1, err
        assert err.startswith(f"resflax: error: these torchvision weights cannot be a shortcut {opt} network: ")
        assert err.endswith("the file holds shortcut B: import with --config.shortcut=B")
        assert not (tmp_path / opt).exists()
    # C: torchvision's own BasicBlock with a projection (1x1 conv + BN) on every block
    c = tv.models.resnet18(weights=None)
    for layer in (c.layer1, c.layer2, c.layer3, c.layer4):
        for blk in layer:
            if blk.downsample is None:
                n = blk.conv1.in_channels
                blk.downsample = torch.nn.Sequential(torch.nn.Conv2d(n, blk.conv2.out_channels, 1, blk.conv1.stride,
                                                                     bias=False),
                                                     torch.nn.BatchNorm2d(blk.conv2.out_channels))
    c = _random_bn(c)
    _save(c, tmp_path / "c.safetensors")
    rc, _, err = _import(capsys, tmp_path / "c.safetensors", "--model", "resnet18", "--workdir", tmp_path / "Cok",
                         "--config.shortcut=C")
    assert rc == 0, err
    assert json.loads((tmp_path / "Cok" / "config.json").read_text())["shortcut"] == "C"
    x = _photos()
    want = _logits_torch(c, x)
    got = _logits_run(tmp_path / "Cok", x)
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max()), np.abs(got - want).max()
    # ... and without the option, the file is refused as not the default B
    rc, _, err = _import(capsys, tmp_path / "c.safetensors", "--model", "resnet18", "--workdir", tmp_path / "Cno")
    assert rc == 2 and err.endswith("the file holds shortcut C: import with --config.shortcut=C"), err


def test_akamaster_names_with_option_a_zero_channels_appended_import_as_given(tmp_path, capsys):
    """akamaster's CIFAR ResNets split option A's zero channels on both sides; a file of those names whose network
    appended them (fb.resnet.torch's layout) cannot say so either: ``--config.pad_layout=append`` is honoured."""
    torch_nets = pytest.importorskip("torch_nets")
    F = torch.nn.functional
    torch.manual_seed(0)
    split = torch_nets.randomize_bn(torch_nets.DataParallelLike(torch_nets.CifarResNet(3)))
    append = torch_nets.randomize_bn(torch_nets.DataParallelLike(torch_nets.CifarResNet(3)))
    append.load_state_dict(split.state_dict())
    for block in append.modules():
        if isinstance(block, torch_nets.CifarBlock) and block.pad:
            def forward(x, b=block):  # the zero channels after the real ones
                y = b.bn2(b.conv2(F.relu(b.bn1(b.conv1(x)))))
                return F.relu(y + F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 0, 2 * b.pad)))
            block.forward = forward
    _save(split, tmp_path / "r20.safetensors")
    ims = [skdata.coffee(), skdata.chelsea(), skdata.astronaut(), skdata.rocket()]
    x = np.stack([np.asarray(Image.fromarray(im).resize((32, 32), Image.Resampling.BILINEAR)) for im in ims])
    x = (x.astype(np.float32) / 255 - MEAN) / STD
    want = {"append": _logits_torch(append, x), "split": _logits_torch(split, x)}
    assert np.abs(want["append"] - want["split"]).max() > 0.1
    for layout, flags in (("append", ["--config.pad_layout=append"]), ("split", [])):
        rc, _, err = _import(capsys, tmp_path / "r20.safetensors", "--model", "resnet20", "--workdir",
                             tmp_path / layout, *flags)
        assert rc == 0, err
        got = _logits_run(tmp_path / layout, x)
        assert np.abs(got - want[layout]).max() <= 1e-4, (layout, np.abs(got - want[layout]).max())
        assert json.loads((tmp_path / layout / "config.json").read_text())["pad_layout"] == layout
