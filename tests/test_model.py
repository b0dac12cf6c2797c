import torch

from learner.core.config import ModelConfig
from learner.core.model import IncrementalNet, load_model, save_model


def _count(net: torch.nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in net.modules())


def test_resnet32_shape_and_depth():
    g = torch.Generator().manual_seed(0)
    net = IncrementalNet.create(ModelConfig(backbone="resnet32"), g, 10)
    # 3 stages x 5 blocks x 2 convs + the stem = 31 conv layers on the main path, + the FC.
    convs = [
        m
        for m in net.backbone.modules()
        if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)
    ]
    assert len(convs) == 31
    assert {c.out_channels for c in convs} == {16, 32, 64}
    out = net(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    assert net.feature_dim == 64


def test_resnet18_for_224_inputs():
    g = torch.Generator().manual_seed(0)
    net = IncrementalNet.create(ModelConfig(backbone="resnet18"), g, 5)
    assert net(torch.randn(1, 3, 224, 224)).shape == (1, 5)
    assert net.feature_dim == 512


def test_grow_keeps_old_rows_and_is_seeded():
    g = torch.Generator().manual_seed(0)
    net = IncrementalNet.create(ModelConfig(backbone="resnet8"), g, 3)
    old_w = net.head.weight.detach().clone()
    old_b = net.head.bias.detach().clone()
    net.grow(7, torch.Generator().manual_seed(5))
    assert net.num_classes == 7
    assert torch.equal(net.head.weight[:3], old_w)
    assert torch.equal(net.head.bias[:3], old_b)
    other = IncrementalNet.create(
        ModelConfig(backbone="resnet8"), torch.Generator().manual_seed(0), 3
    )
    other.grow(7, torch.Generator().manual_seed(5))
    assert torch.equal(other.head.weight, net.head.weight)


def test_empty_head_for_version_zero():
    net = IncrementalNet.create(ModelConfig(backbone="resnet8"), torch.Generator().manual_seed(0))
    assert net.num_classes == 0
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 0)


def test_safetensors_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    net = IncrementalNet.create(ModelConfig(backbone="resnet8", in_channels=1), g, 4)
    path = tmp_path / "m.safetensors"
    save_model(net, path, extra={"classes": ["a", "b", "c", "d"]})
    loaded, extra = load_model(path)
    assert extra == {"classes": ["a", "b", "c", "d"]}
    assert loaded.config == net.config
    x = torch.randn(3, 1, 28, 28)
    net.eval()
    loaded.eval()
    assert torch.equal(net(x), loaded(x))
    # safetensors, not pickle: the file starts with a little-endian header length and JSON.
    raw = path.read_bytes()
    assert raw[8:9] == b"{"
