"""Model zoo: every registered model trains and evaluates, official sizes and layouts, layer choices.

Liu et al., *Deep Hyperspherical Learning*, NIPS 2017 (arXiv 1711.03189); official SphereNet-9 / CNN-9 and
SphereResNet-32 of wy1iu/SphereNet (reference ``spherenet.md`` sections 6-7).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, assert_close
from torch import nn

from torchsphere.models import (CONV_CHOICES, NORMS, LayerConfig, PlainNet, ResNet, create_model,
                                list_models)
from torchsphere.nn import AngularHead, OfficialBatchNorm2d, SphereConv2d, SphereNorm2d

NUM_CLASSES = 10


def _small(name: str, **kw) -> dict:
    """Overrides that make any registered model tiny: 4-16 channels per stage."""
    if "resnet" in name and "32" not in name:  # ImageNet-style, widths 64..512
        return dict(width_mult=1 / 16, num_classes=NUM_CLASSES, **kw)
    if "resnet" in name:  # CIFAR, widths 96/192/384
        return dict(width_mult=1 / 24, **kw)
    return dict(width_mult=1 / 32, feature_dim=8, **kw)  # plain, widths 128/192/256


def _batch(in_channels: int = 3, size: int = 32, n: int = 2):
    x = torch.randn(n, in_channels, size, size).to(DEVICE)
    y = torch.randint(0, NUM_CLASSES, (n,)).to(DEVICE)
    return x, y


def _train_step_checks(model: nn.Module, x, y) -> None:
    """Output shape, finite values, and a finite gradient on every parameter."""
    model.train()
    logits = model(x, y)
    assert logits.shape == (x.shape[0], NUM_CLASSES)
    assert torch.isfinite(logits).all()
    F.cross_entropy(logits, y).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradients: {bad}"


# ---------------------------------------------------------------------------------- every registered model
@pytest.mark.parametrize("name", list_models())
def test_registered_model_train_and_eval(name):
    model = create_model(name, **_small(name)).to(DEVICE)
    x, y = _batch()
    _train_step_checks(model, x, y)
    model.eval()
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, NUM_CLASSES) and torch.isfinite(out).all()
        torch.testing.assert_close(model(x), out, rtol=0, atol=0)  # eval is deterministic
        feats = model.forward_features(x)
        assert feats.shape == (2, model.num_features)
        torch.testing.assert_close(model.forward_head(feats), out, rtol=0, atol=0)
    assert {"architecture", "operator", "norm", "head"} <= set(model.default_cfg)


@pytest.mark.parametrize("name", ["cnn9", "spherenet9", "resnet32", "sphere_resnet32"])
def test_one_channel_28x28_input(name):
    model = create_model(name, **_small(name, in_channels=1, **({} if "resnet" in name else {"input_size": 28})))
    _train_step_checks(model.to(DEVICE), *_batch(in_channels=1, size=28))


def test_fc6_kernel_covers_the_remaining_map():
    assert create_model("cnn9", width_mult=0.05).fc6.kernel_size == (4, 4)  # 32 / 8
    assert create_model("cnn9", width_mult=0.05, input_size=28).fc6.kernel_size == (3, 3)  # floor(28 / 8)
    assert create_model("cnn9", width_mult=0.05, input_size=(40, 24)).fc6.kernel_size == (5, 3)


# ---------------------------------------------------------------------------------- official configuration
def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["cnn9", "spherenet9"])
def test_official_parameter_count(name):
    # reference spherenet.md 6.1: 3,859,712 with fc6 BN off (HEAD, our default), 3,860,224 with fc6 BN on
    model = create_model(name)
    assert _num_params(model) == 3_859_712
    assert isinstance(model.fc6_norm, nn.Identity) and model.default_cfg["fc_norm"] is False
    assert _num_params(create_model(name, fc_norm=True)) == 3_860_224


def test_learnable_sigmoid_adds_one_k_per_sphere_channel():
    # 128*3 + 192*3 + 256*3 stage channels + 256 fc6 channels = 1,984 k-values (reference 6.1)
    assert _num_params(create_model("spherenet9", operator="learnable_sigmoid")) == 3_859_712 + 1_984


def test_official_spherenet9_layers():
    model = create_model("spherenet9")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 10 and all(type(m) is SphereConv2d and m.operator == "cosine" for m in convs)
    assert [m.out_channels for m in convs] == [128] * 3 + [192] * 3 + [256] * 3 + [256]
    assert all(m.bias is None for m in convs) and type(model.fc) is nn.Linear and model.fc.bias is None
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 9 and all(type(m) is nn.BatchNorm2d and m.eps == 1e-3 and m.momentum == 0.1 for m in bns)
    official = [m for m in create_model("spherenet9", bn_stats="official").modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(official) == 9 and all(type(m) is OfficialBatchNorm2d and m.eps == 1e-3 and m.momentum == 1e-3
                                      for m in official)
    assert all(type(m) is nn.Conv2d for m in create_model("cnn9").modules() if isinstance(m, nn.Conv2d))


def test_sphere_resnet32_official_layout():
    model = create_model("sphere_resnet32")
    assert _num_params(model) == 16_702_176  # reference 6.3: ~16.70 M
    assert model.default_cfg["operator"] == "linear" and model.fc.in_features == 384
    assert [len(s) for s in model.stages()] == [5, 5, 5]
    convs = dict(model.named_modules())
    assert type(convs["conv1"]) is SphereConv2d and convs["conv1"].kernel_size == (3, 3)
    assert convs["layer1.0"].downsample is None  # 96 -> 96: identity shortcut
    shortcut = convs["layer2.0.downsample.0"]
    assert type(shortcut) is nn.Conv2d and shortcut.kernel_size == (1, 1) and shortcut.stride == (2, 2)
    assert shortcut.bias is None
    depth = sum(isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) for m in model.modules()) + 1  # + classifier
    assert depth == 32


# torchvision's layout of resnet18/34 and sphere_resnet18/34 (keys, strict loading, forward): test_resnet_torchvision.py


def test_he_normal_init_and_bn_init():
    model = create_model("cnn9")
    w = model.stages[2][1].conv.weight  # 256 x 256 x 3 x 3: 589,824 draws
    assert abs(w.mean().item()) < 1e-3
    assert w.std().item() == pytest.approx(math.sqrt(2 / (256 * 9)), rel=0.01)
    assert model.fc.weight.std().item() == pytest.approx(math.sqrt(2 / 256), rel=0.1)
    assert model.fc6.weight.std().item() == pytest.approx(math.sqrt(2 / (256 * 16)), rel=0.01)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and torch.equal(m.bias, torch.zeros_like(m.bias))
    head = create_model("spherenet9", head="wsoftmax").fc
    assert head.weight.std().item() == pytest.approx(math.sqrt(2 / 256), rel=0.1)


# ---------------------------------------------------------------------------------- layer choices
@pytest.mark.parametrize("operator", CONV_CHOICES)
def test_operator_choice_reaches_every_conv(operator):
    family = "cnn9" if operator == "conv" else "spherenet9"  # a plain baseline refuses a sphere operator
    model = create_model(family, **_small(family, operator=operator))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if operator == "conv":
        assert all(type(m) is nn.Conv2d for m in convs)
    else:
        # the architectures apply no in-place op to a conv output, so their layers save the output
        assert all(type(m) is SphereConv2d and m.operator == operator and m.memory_efficient for m in convs)
    _train_step_checks(model.to(DEVICE), *_batch())  # learnable_sigmoid: every k receives a gradient too


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("family", ["spherenet9", "sphere_resnet32"])
def test_norm_choices(norm, family):
    kwargs = _small(family, norm=norm)
    if norm == "gn":  # 8 groups need stage widths that are multiples of 8
        kwargs["width_mult"] = 1 / 8 if family == "spherenet9" else 1 / 12
    model = create_model(family, **kwargs)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    sphere = [m for m in model.modules() if isinstance(m, SphereConv2d)]
    assert bool(bns) == (norm in ("bn", "spherenorm+bn"))
    assert bool([m for m in model.modules() if isinstance(m, nn.GroupNorm)]) == (norm == "gn")
    assert all(isinstance(m, SphereNorm2d) == norm.startswith("spherenorm") for m in sphere)
    _train_step_checks(model.to(DEVICE), *_batch())


def test_spherenorm_without_bn_is_batch_independent():
    model = create_model("spherenet9", **_small("spherenet9", norm="spherenorm")).to(DEVICE)
    x, _ = _batch(n=3)
    model.train()
    full = model(x)
    single = torch.cat([model(x[i:i + 1]) for i in range(3)])
    model.eval()
    assert_close(single, full)
    assert_close(model(x), full)

@pytest.mark.parametrize("head, extra", [("softmax", {}), ("wsoftmax", {"head_operator": "linear"}),
                                         ("gasoftmax", {"margin": 2.5}),
                                         ("gasoftmax", {"margin": 4, "head_operator": "sigmoid"})])


def test_head_choices_and_labels(head, extra):
    model = create_model("spherenet9", **_small("spherenet9", head=head, **extra)).to(DEVICE)
    x, y = _batch()
    _train_step_checks(model, x, y)
    with torch.no_grad():
        plain, labelled = model(x), model(x, y)
    if head == "softmax":
        assert type(model.fc) is nn.Linear
        torch.testing.assert_close(labelled, plain, rtol=0, atol=0)  # a linear head ignores labels
        return
    assert isinstance(model.fc, AngularHead)
    assert model.fc.operator == extra.get("head_operator", "cosine")
    assert model.fc.margin == (1.0 if head == "wsoftmax" else extra["margin"])
    if head == "wsoftmax":
        assert_close(labelled, plain)
    else:  # the margin lowers the target logit, only when labels are given
        target = labelled.gather(1, y[:, None]) - plain.gather(1, y[:, None])
        assert (target < 0).all()
        others = torch.ones_like(plain, dtype=torch.bool).scatter_(1, y[:, None], False)
        assert_close(labelled[others], plain[others])


def test_overrides_width_depth_bn_feature_dim():
    model = create_model("cnn9", widths=(4, 6, 8), layers_per_stage=(1, 2, 3), feature_dim=2, bn_eps=1e-5,
                         bn_momentum=0.1, num_classes=NUM_CLASSES)
    assert [len(s) for s in model.stages] == [1, 2, 3]
    assert [s[0].conv.out_channels for s in model.stages] == [4, 6, 8]
    assert model.num_features == 2 and model.forward_features(_batch()[0].cpu()).shape == (2, 2)
    assert all((m.eps, m.momentum) == (1e-5, 0.1) for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert [s[0].conv.out_channels for s in create_model("cnn9", width_mult=0.5).stages] == [64, 96, 128]


def test_deep_plain_variant_has_60_conv_layers():
    model = create_model("spherenet60", **_small("spherenet60"))
    convs = [m for m in model.modules() if isinstance(m, SphereConv2d) and m.kernel_size == (3, 3)]
    assert len(convs) == 60
    assert len([m for m in create_model("cnn69", width_mult=0.05).modules() if isinstance(m, nn.ReLU)]) == 69


def test_default_cfg_is_plain_data():
    cfg = create_model("sphere_resnet32", width_mult=0.05, head="gasoftmax", margin=2.0).default_cfg
    assert cfg["head"] == "gasoftmax" and cfg["margin"] == 2.0 and cfg["norm"] == "bn"
    assert all(isinstance(v, (str, int, float, bool, tuple, type(None))) for v in cfg.values())
    assert LayerConfig(**{k: cfg[k] for k in ("operator", "norm", "head", "margin")}).head == "gasoftmax"


@pytest.mark.parametrize("name, extra", [("cnn9", {}), ("sphere_resnet32", {"head": "gasoftmax", "margin": 3.0})])
def test_reset_classifier(name, extra):
    model = create_model(name, **_small(name, **extra)).to(DEVICE)
    model.reset_classifier(5)
    assert model.num_classes == 5 and model.default_cfg["num_classes"] == 5
    assert type(model.fc) is (nn.Linear if not extra else AngularHead)
    if extra:
        assert model.fc.margin == 3.0
    x, _ = _batch()
    assert model(x, torch.tensor([0, 4], device=DEVICE)).shape == (2, 5)
    assert model.fc.weight.device == x.device


# ---------------------------------------------------------------------------------- torch.compile
@pytest.mark.parametrize("name", ["spherenet9", "sphere_resnet32"])
def test_compile_matches_eager(name):
    model = create_model(name, **_small(name, layers_per_stage=2)).to(DEVICE).eval()  # fewer units to trace
    x, _ = _batch()
    with torch.no_grad():
        expected = model(x)
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        assert_close(compiled(x), expected)


def test_export_matches_eager():
    model = create_model("spherenet9", **_small("spherenet9", head="gasoftmax", margin=2.0)).to(DEVICE).eval()
    x, _ = _batch()
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        assert_close(exported.module()(x), model(x))

# ---------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("overrides, exc, match", [
    ({"operator": "cosin"}, ValueError, r"unknown operator 'cosin'; choose from \['conv', 'linear'"),
    ({"operator": 1}, TypeError, "operator must be a str"),
    ({"norm": "batchnorm"}, ValueError, "unknown norm 'batchnorm'"),
    ({"head": "arcface"}, ValueError, "unknown head 'arcface'"),
    ({"head": "gasoftmax"}, ValueError, "head='gasoftmax' needs a margin > 1.*got margin=None"),
    ({"head": "gasoftmax", "margin": 1.0}, ValueError, "needs a margin > 1.*got margin=1.0"),
    ({"head": "wsoftmax", "margin": 2.0}, ValueError, "head='wsoftmax' has margin 1; got margin=2.0"),
    ({"margin": 2.0}, ValueError, "margin applies only to the angular heads.*head='softmax'"),
    ({"head_operator": "linear"}, ValueError, "head_operator applies only"),
    ({"head": "wsoftmax", "head_operator": "cos"}, ValueError, "unknown sphere operator 'cos'"),
    ({"operator": "conv"}, ValueError, "spherenet9 is a sphere model; operator='conv' would turn it into a plain"),
    ({"sigmoid_k": 0.5}, ValueError, "sigmoid_k applies only.*operator='cosine'"),
    ({"bn_eps": 0.0}, ValueError, "bn_eps must be a finite number > 0; got 0.0"),
    ({"bn_momentum": 1.5}, ValueError, r"bn_momentum must be in \(0, 1\]; got 1.5"),
    ({"width_mult": -1.0}, ValueError, "width_mult must be a finite number > 0; got -1.0"),
    ({"widths": (8, 8), "layers_per_stage": (1, 2, 3)}, ValueError,
     r"layers_per_stage needs one entry per stage \(2\); got \(1, 2, 3\)"),
    ({"widths": ()}, ValueError, r"widths must be a non-empty sequence of ints; got \(\)"),
    ({"layers_per_stage": (1, 2)}, ValueError, r"layers_per_stage needs one entry per stage \(3\)"),
    ({"layers_per_stage": 0}, ValueError, "layers_per_stage must be >= 1; got 0"),
    ({"input_size": 4}, ValueError, "input_size must be >= 8; got 4"),
    ({"in_channels": True}, TypeError, "in_channels must be an int; got bool True"),
    ({"num_classes": 0}, ValueError, "num_classes must be >= 1; got 0"),
    ({"fc_norm": 1}, TypeError, "fc_norm must be a bool; got int 1"),
])


def test_bad_overrides(overrides, exc, match):
    with pytest.raises(exc, match=match):
        create_model("spherenet9", **{"width_mult": 0.05, **overrides})


def test_a_plain_net_refuses_spherenorm():
    with pytest.raises(ValueError, match="needs a sphere operator.*got operator='conv'"):
        create_model("cnn9", width_mult=0.05, norm="spherenorm")


def test_bad_resnet_overrides_and_inputs():
    with pytest.raises(ValueError, match=r"unknown stem 'vit'; choose from \['cifar', 'imagenet'\]"):
        create_model("resnet32", stem="vit")
    with pytest.raises(ValueError, match="widths must be a non-empty sequence of ints; got 64"):
        ResNet(widths=64)
    with pytest.raises(ValueError, match=r"PlainNet built for input \(N, C, 32, 32\).*got shape \(2, 3, 28, 28\)"):
        create_model("cnn9", width_mult=0.05)(torch.randn(2, 3, 28, 28))
    with pytest.raises(ValueError, match=r"ResNet expects input \(N, C, H, W\); got shape \(3, 32, 32\)"):
        create_model("resnet32", width_mult=0.05)(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="input_size must be an int or"):
        PlainNet(input_size=(32, 32, 3))
