"""Penultimate features (torchsphere.ensemble.features) for every registered model family and a converted model."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import assert_close
from torchsphere import convert_to_sphere
from torchsphere.ensemble import extract_features, feature_layer
from torchsphere.models import create_model, list_models
from torchsphere.models.plain import PlainNet
from torchsphere.models.resnet import ResNet


def _tiny(name: str) -> nn.Module:
    if "resnet" in name and "32" not in name:
        return create_model(name, width_mult=1 / 16, num_classes=3)
    if "resnet" in name:
        return create_model(name, width_mult=1 / 24, num_classes=3)
    return create_model(name, width_mult=1 / 32, feature_dim=8, num_classes=3)


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_gives_the_classifier_input(name):
    model = _tiny(name).train()
    x = torch.randn(5, 3, 32, 32)
    feats = extract_features(model, x)
    assert feats.shape == (5, model.num_features) and feats.dtype == torch.float32
    assert model.training  # mode restored
    seen = []
    model.fc.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    model.eval()
    with torch.no_grad():
        model(x)
    assert_close(feats, torch.flatten(seen[0], 1))  # exactly what the head receives in eval mode
    assert_close(extract_features(model, x, layer="fc"), feats)  # the generic hook path agrees
    expected = "avgpool" if isinstance(model, ResNet) else "fc6"
    assert isinstance(model, (PlainNet, ResNet)) and feature_layer(model) == expected


def test_batches_are_concatenated_in_order():
    model = _tiny("cnn9")
    x = torch.randn(5, 3, 32, 32)
    assert_close(extract_features(model, x, batch_size=2), extract_features(model, x))


def test_plain_net_with_fc_norm_names_it():
    model = create_model("cnn9", width_mult=1 / 32, feature_dim=8, fc_norm=True)
    assert feature_layer(model) == "fc6_norm"


def test_converted_foreign_model_uses_the_input_of_its_last_linear():
    torch.manual_seed(0)
    foreign = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                            nn.Flatten(), nn.Linear(16, 6), nn.ReLU(), nn.Linear(6, 3))
    model = convert_to_sphere(foreign, operator="cosine", exclude=["7"])  # the classifier stays plain
    x = torch.randn(7, 1, 8, 8)
    feats = extract_features(model, x)
    model.eval()
    with torch.no_grad():
        expected = model[:7](x)  # everything before the classifier
    assert_close(feats, expected)
    assert feature_layer(model) == "input of 7"
    assert_close(extract_features(model, x, layer="5"), model[:5](x))  # another layer's input, by name


def test_errors():
    with pytest.raises(TypeError, match="model must be an nn.Module; got str"):
        extract_features("cnn9", torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="has no nn.Linear classifier"):
        extract_features(nn.Sequential(nn.Conv2d(1, 2, 3)), torch.randn(1, 1, 8, 8))
    with pytest.raises(ValueError, match="layer 'head' is not a module of"):
        extract_features(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), torch.randn(1, 4), layer="head")
    model = create_model("cnn9", width_mult=1 / 32, feature_dim=8, input_size=28, in_channels=1)
    with pytest.raises(ValueError, match=r"PlainNet built for input \(N, C, 28, 28\)"):
        extract_features(model, torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match="cannot take inputs of shape"):
        extract_features(model, torch.randn(2, 3, 28, 28))  # 3 channels into a 1-channel model
