"""CIFAR ResNet-18 / VGG-19-BN and torchvision ResNet-50: sizes, names, forward/backward, NSR hooks."""

import pytest
import torch
import torch.nn.functional as F

from models import build_model
from models.resnet_cifar import resnet18_cifar
from models.vgg import vgg19_bn_cifar
from nsr import NeuronSteadiness


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("name,classes,shape,expected", [
    ("resnet18", 10, (3, 32, 32), 11_173_962),
    ("vgg19", 10, (3, 32, 32), 20_040_522),
    ("resnet50", 1000, (3, 224, 224), 25_557_032),
])
def test_parameter_counts(name, classes, shape, expected):
    assert n_params(build_model(name, classes, shape)) == expected


def test_direct_constructors_match_registry():
    assert n_params(resnet18_cifar(num_classes=10, in_channels=3)) == 11_173_962
    assert n_params(vgg19_bn_cifar(num_classes=10, in_channels=3)) == 20_040_522
    # 100 classes changes only the output layer: 512 * 90 weights + 90 biases more.
    assert n_params(resnet18_cifar(num_classes=100)) == 11_173_962 + 513 * 90


def _forward_backward(model, x, classes):
    model.train()
    logits = model(x)
    assert logits.shape == (x.shape[0], classes)
    assert torch.isfinite(logits).all()
    F.cross_entropy(logits, torch.arange(x.shape[0]) % classes).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"


@pytest.mark.parametrize("name,classes,shape", [
    ("resnet18", 10, (3, 32, 32)),
    ("vgg19", 10, (3, 32, 32)),
    ("resnet50", 1000, (3, 64, 64)),  # small input keeps CPU time low; the net is size-agnostic
])
def test_forward_backward(name, classes, shape):
    model = build_model(name, classes, shape)
    _forward_backward(model, torch.randn(2, *shape), classes)


@pytest.mark.parametrize("name", ["resnet18", "vgg19"])
def test_grayscale_28x28(name):
    model = build_model(name, 10, (1, 28, 28))
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("name,layers", [
    ("resnet18", ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc"]),
    ("vgg19", ["features", "avgpool", "fc"]),
    ("resnet50", ["layer4", "fc"]),
])
def test_layer_names(name, layers):
    modules = dict(build_model(name, 10, (3, 32, 32)).named_modules())
    for layer in layers:
        assert layer in modules, f"{name} has no module {layer!r}"
    assert isinstance(modules["fc"], torch.nn.Linear)


def test_feature_shapes_for_nsr_targets():
    x = torch.randn(2, 3, 32, 32)
    r = resnet18_cifar().eval()
    v = vgg19_bn_cifar().eval()
    with torch.no_grad():
        assert r.layer4(r.layer3(r.layer2(r.layer1(r.relu(r.bn1(r.conv1(x))))))).shape == (2, 512, 4, 4)
        assert v.features(x).shape == (2, 512, 1, 1)
    # VGG's single fc layer: 512 inputs, no hidden classifier.
    assert v.fc.in_features == 512 and v.fc.out_features == 10


@pytest.mark.parametrize("name,layers", [
    ("resnet18", {"fc": 0.5, "layer4": 0.1}),
    ("vgg19", {"fc": 0.5, "features": 0.1}),
])
def test_nsr_on_named_layers(name, layers):
    model = build_model(name, 10, (3, 32, 32))
    reg = NeuronSteadiness(model, layers, num_classes=10, per_channel=True)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 0, 1])
    loss = F.cross_entropy(model(x), y) + reg(y)
    loss.backward()
    assert torch.isfinite(loss)
    assert set(reg.last) == set(layers) and all(v > 0 for v in reg.last.values())
    assert model.fc.weight.grad is not None
