"""convert_to_sphere / revert_from_sphere on local models and, when installed, timm.

The converted layers must compute what the functional ops compute on the original weights; revert must restore the
original outputs exactly; converting twice equals converting once.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, REF_ATOL, assert_close
from torch import nn

from torchsphere import convert_to_sphere, revert_from_sphere
from torchsphere.functional import sphere_conv1d, sphere_conv2d, sphere_conv3d, sphere_linear
from torchsphere.models import create_model
from torchsphere.nn import SphereConv1d, SphereConv2d, SphereConv3d, SphereLinear, SphereNorm2d

SPHERE_FN = {nn.Conv1d: sphere_conv1d, nn.Conv2d: sphere_conv2d, nn.Conv3d: sphere_conv3d}
SPHERE_TYPE = {nn.Conv1d: SphereConv1d, nn.Conv2d: SphereConv2d, nn.Conv3d: SphereConv3d}


def _small_resnet18() -> nn.Module:
    """A local model with the structure of torchvision's / timm's resnet18 (plain nn.Conv2d, same names)."""
    return create_model("resnet18", width_mult=1 / 16, num_classes=10).to(DEVICE)


def _conv_types(model: nn.Module) -> dict[str, type]:
    return {n: type(m) for n, m in model.named_modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))}

# ----------------------------------------------------------------------------------- layer-level equivalence
CONV_CASES = [
    (nn.Conv1d, dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1, bias=True), (2, 4, 11)),
    (nn.Conv2d, dict(in_channels=4, out_channels=6, kernel_size=3, padding=2, dilation=2, groups=2), (2, 4, 9, 8)),
    (nn.Conv2d, dict(in_channels=3, out_channels=5, kernel_size=(3, 2), stride=(2, 1), padding="valid"),
     (2, 3, 9, 8)),
    (nn.Conv2d, dict(in_channels=3, out_channels=4, kernel_size=3, padding=1, padding_mode="reflect", bias=True),
     (2, 3, 7, 7)),
    (nn.Conv3d, dict(in_channels=2, out_channels=3, kernel_size=3, padding=1, stride=(1, 2, 2)), (2, 2, 5, 6, 6)),
]


@pytest.mark.parametrize("operator", ["linear", "cosine", "sigmoid", "learnable_sigmoid"])
@pytest.mark.parametrize("cls, kwargs, shape", CONV_CASES)
def test_converted_conv_computes_the_functional_op(cls, kwargs, shape, operator):
    conv = cls(**kwargs, device=DEVICE, dtype=torch.float64)
    weight, bias = conv.weight.detach().clone(), None if conv.bias is None else conv.bias.detach().clone()
    x = torch.randn(shape, dtype=torch.float64).to(DEVICE)
    new = convert_to_sphere(conv, operator, sigmoid_k=0.5 if "sigmoid" in operator else None)
    assert type(new) is SPHERE_TYPE[cls] and new.operator == operator
    for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                 "padding_mode"):
        assert getattr(new, attr) == getattr(conv, attr)
    assert new.weight is conv.weight and new.bias is conv.bias  # the same Parameters, shared
    padding, xin = conv.padding, x
    if conv.padding_mode != "zeros":
        xin, padding = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode), 0
    k = 0.5 if operator == "sigmoid" else (new.effective_k() if operator == "learnable_sigmoid" else 0.3)
    if operator == "learnable_sigmoid":
        assert_close(new.effective_k(), torch.full_like(new.effective_k(), 0.5))
    expected = SPHERE_FN[cls](xin, weight, bias, conv.stride, padding, conv.dilation, conv.groups,
                              operator=operator, sigmoid_k=k)
    assert_close(new(x), expected)


def test_converted_linear_computes_the_functional_op():
    model = nn.Sequential(nn.Linear(5, 4, bias=True), nn.ReLU(), nn.Linear(4, 3)).double()
    w, b = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    assert type(convert_to_sphere(model)[0]) is nn.Linear  # Linear kept by default
    model = convert_to_sphere(model, "linear", convert_linear=True)
    assert type(model[0]) is SphereLinear and type(model[2]) is SphereLinear and model[0].operator == "linear"
    x = torch.randn(6, 5, dtype=torch.float64)
    assert_close(model[0](x), sphere_linear(x, w, b, operator="linear"))


# ----------------------------------------------------------------------------------- whole models
def test_converted_baseline_equals_the_registered_spherenet():
    """resnet18 converted (stem included, shortcuts kept plain) computes what sphere_resnet18 computes (both with the
    official bias-free score layer; with torchvision's fc bias: test_resnet_torchvision.py)."""
    base = create_model("resnet18", width_mult=1 / 16, num_classes=10, head_bias=False).to(DEVICE).eval()
    sphere = create_model("sphere_resnet18", width_mult=1 / 16, num_classes=10, operator="linear").to(DEVICE).eval()
    sphere.load_state_dict(base.state_dict())
    converted = convert_to_sphere(base, "linear", exclude="*.downsample.*")
    assert _conv_types(converted) == _conv_types(sphere)
    x = torch.randn(2, 3, 32, 32).to(DEVICE)
    with torch.no_grad():
        assert_close(converted(x), sphere(x))


def test_revert_restores_the_original_outputs_exactly():
    model = _small_resnet18().eval()
    original_types = _conv_types(model)
    x = torch.randn(2, 3, 32, 32).to(DEVICE)
    with torch.no_grad():
        before = model(x)
        model = convert_to_sphere(model, "sigmoid", convert_linear=True)
        assert not torch.allclose(model(x), before)
        model = revert_from_sphere(model)
        after = model(x)
    assert _conv_types(model) == original_types
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_conversion_is_idempotent():
    model = _small_resnet18()
    once = convert_to_sphere(model, "cosine", exclude=["conv1"])
    layers = dict(once.named_modules())
    twice = convert_to_sphere(once, "cosine", exclude=["conv1"])
    assert all(m is layers[n] for n, m in twice.named_modules())  # nothing rebuilt
    again = convert_to_sphere(twice, "linear")  # existing sphere layers are left alone; the stem is converted now
    assert again.layer1[0].conv1.operator == "cosine" and type(again.conv1) is SphereConv2d
    assert revert_from_sphere(revert_from_sphere(again)) is again


def test_include_and_exclude_select_layers():
    def sphere_names(model):
        return {n for n, t in _conv_types(model).items() if t in (SphereConv2d, SphereLinear)}

    all_convs = {n for n, t in _conv_types(_small_resnet18()).items() if t is nn.Conv2d}
    # a qualified name matches itself only; a parent's name matches everything inside it
    assert sphere_names(convert_to_sphere(_small_resnet18(), exclude="conv1")) == all_convs - {"conv1"}
    assert sphere_names(convert_to_sphere(_small_resnet18(), include="layer2")) == {
        n for n in all_convs if n.startswith("layer2.")}
    assert sphere_names(convert_to_sphere(_small_resnet18(), include=["layer*.0.conv1"], exclude="layer4")) == {
        "layer1.0.conv1", "layer2.0.conv1", "layer3.0.conv1"}
    assert sphere_names(convert_to_sphere(_small_resnet18(), include=lambda n, m: m.kernel_size == (1, 1))) == {
        n for n in all_convs if "downsample" in n}
    strided = lambda n, m: getattr(m, "stride", (1, 1)) != (1, 1)  # noqa: E731
    assert sphere_names(convert_to_sphere(_small_resnet18(), exclude=strided, convert_linear=True)) == {
        n for n, m in _small_resnet18().named_modules() if n in all_convs and m.stride == (1, 1)} | {"fc"}


def test_conversion_keeps_device_dtype_mode_and_requires_grad():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))).to(
        device=DEVICE, dtype=torch.float64)
    model[1].eval()
    model[0].weight.requires_grad_(False)
    model[0].qconfig = "marker"
    model = convert_to_sphere(model, "learnable_sigmoid")
    assert model.training and not model[1].training and not model[1][0].training
    assert model[0].weight.dtype == torch.float64 and model[0].weight.device.type == DEVICE.type
    assert model[0].sigmoid_k_raw.dtype == torch.float64 and model[0].sigmoid_k_raw.device.type == DEVICE.type
    assert not model[0].weight.requires_grad and model[0].qconfig == "marker"


def test_optimizer_built_before_conversion_keeps_training_the_layers():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model[0].weight.detach().clone()
    model = convert_to_sphere(model)
    model(torch.randn(2, 3, 6, 6)).sum().backward()
    opt.step()
    assert not torch.equal(model[0].weight, before)


def test_shared_layer_gets_one_replacement():
    conv = nn.Conv2d(2, 2, 3, padding=1)
    model = convert_to_sphere(nn.Sequential(conv, nn.ReLU(), conv))
    assert type(model[0]) is SphereConv2d and model[0] is model[2]


def test_subclasses_and_sphere_norm_are_left_alone():
    class StdConv2d(nn.Conv2d):  # a subclass with its own forward, as timm's
        pass

    attention = nn.MultiheadAttention(8, 2)
    model = nn.ModuleDict(dict(std=StdConv2d(2, 2, 1), norm=SphereNorm2d(2, 2, 1), attn=attention))
    model = convert_to_sphere(model, convert_linear=True)
    assert type(model["std"]) is StdConv2d and type(model["attn"].out_proj) is not SphereLinear
    assert type(revert_from_sphere(model)["norm"]) is SphereNorm2d


def test_convert_bad_input():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module; got str"):
        convert_to_sphere("resnet18")
    with pytest.raises(ValueError, match="unknown sphere operator 'cos'"):
        convert_to_sphere(nn.Conv2d(1, 1, 1), "cos")
    with pytest.raises(ValueError, match="sigmoid_k applies only.*operator='cosine'"):
        convert_to_sphere(nn.Conv2d(1, 1, 1), sigmoid_k=0.5)
    with pytest.raises(ValueError, match="sigmoid_k must be a finite number > 0; got -1"):
        convert_to_sphere(nn.Conv2d(1, 1, 1), "sigmoid", sigmoid_k=-1)
    with pytest.raises(TypeError, match="exclude must be None, a module name or pattern.*got int 3"):
        convert_to_sphere(nn.Conv2d(1, 1, 1), exclude=3)
    with pytest.raises(TypeError, match=r"include patterns must be str; got \[1\]"):
        convert_to_sphere(nn.Conv2d(1, 1, 1), include=["a", 1])
    with pytest.raises(TypeError, match="convert_linear must be a bool; got int 1"):
        convert_to_sphere(nn.Conv2d(1, 1, 1), convert_linear=1)
    with pytest.raises(TypeError, match="memory_efficient must be a bool; got str 'no'"):
        convert_to_sphere(nn.Conv2d(1, 1, 1), memory_efficient="no")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module; got NoneType"):
        revert_from_sphere(None)


def test_memory_efficient_conversion_trains_like_the_default():
    """conv -> BN -> ReLU(inplace=True), torchvision's pattern: saving the conv outputs is legal and exact."""
    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                             nn.Conv2d(8, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(inplace=True))

    x = torch.randn(2, 3, 6, 6).to(DEVICE)
    grads = []
    for mem in (False, True):
        model = convert_to_sphere(net(), "sigmoid", memory_efficient=mem).to(DEVICE)
        assert all(m.memory_efficient is mem for m in model.modules() if isinstance(m, SphereConv2d))
        model(x).square().sum().backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=REF_ATOL[torch.float32] * max(1.0, b.abs().max().item()))


@pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm (optional extra) is not installed")
def test_timm_resnet18_round_trip():
    import timm

    model = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        model = convert_to_sphere(model, "linear", exclude=["conv1", "*.downsample.*"])
        assert type(model.layer1[0].conv1) is SphereConv2d and type(model.conv1) is nn.Conv2d
        assert torch.isfinite(model(x)).all()
        torch.testing.assert_close(revert_from_sphere(model)(x), before, rtol=0, atol=0)
