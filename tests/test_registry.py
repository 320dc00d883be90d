"""Model registry: registration, look-up, patterns and the errors of each."""
from __future__ import annotations

import pytest
from torch import nn

from torchsphere.models import PlainNet, ResNet, create_model, is_model, list_models, model_entrypoint, registry
from torchsphere.models import register_model

REQUIRED = ["spherenet9", "cnn9", "spherenet18", "cnn18", "spherenet60", "cnn60", "sphere_resnet32", "resnet32",
            "sphere_resnet18", "sphere_resnet34", "resnet18", "resnet34"]


@pytest.fixture
def private_registry(monkeypatch):
    """A copy of the registry, so the entries registered by a test do not leak into the model tests."""
    monkeypatch.setattr(registry, "_MODELS", dict(registry._MODELS))


def test_required_models_registered():
    names = list_models()
    assert set(REQUIRED) <= set(names)
    assert names == sorted(set(names))


def test_list_models_fnmatch_patterns():
    assert list_models("cnn?") == ["cnn9"]
    assert list_models("sphere_resnet*") == ["sphere_resnet18", "sphere_resnet32", "sphere_resnet34"]
    assert set(list_models("spherenet*")) == {f"spherenet{n}" for n in (9, 18, 30, 45, 60, 69)}
    assert list_models("no_such_*") == []


def test_is_model_and_entrypoint():
    assert is_model("spherenet9") and not is_model("spherenet10") and not is_model(9)
    assert model_entrypoint("cnn9").__name__ == "cnn9"


def test_entries_build_their_family_with_the_name_in_default_cfg():
    plain = create_model("cnn9", width_mult=0.05)
    res = create_model("resnet32", width_mult=0.05)
    assert isinstance(plain, PlainNet) and isinstance(res, ResNet)
    assert plain.default_cfg["architecture"] == "cnn9" and res.default_cfg["architecture"] == "resnet32"
    assert create_model("cnn9", width_mult=0.05) is not plain  # a fresh model each call


def test_overrides_replace_entry_defaults():
    m = create_model("spherenet9", width_mult=0.05, operator="linear", num_classes=7, layers_per_stage=2)
    assert m.default_cfg["operator"] == "linear" and m.default_cfg["layers_per_stage"] == 2
    assert m.fc.out_features == 7 and len(m.stages[0]) == 2


def test_unknown_name_lists_close_matches():
    with pytest.raises(ValueError, match=r"unknown model 'spherenet_9'.*'spherenet9'"):
        create_model("spherenet_9")
    with pytest.raises(ValueError, match=r"unknown model 'zzz'; choose from \["):
        create_model("zzz")
    with pytest.raises(TypeError, match="model name must be a str; got int"):
        create_model(9)


def test_unknown_override_is_a_type_error_naming_it():
    with pytest.raises(TypeError, match=r"spherenet9: unexpected keyword argument\(s\) \['colour', 'depth'\]"):
        create_model("spherenet9", depth=3, colour="red")
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['conv_layer'\]"):
        create_model("resnet32", conv_layer=nn.Conv2d)  # layer types come from the choice strings


def test_register_model_decorator_and_duplicates(private_registry):
    @register_model
    def tiny_net(**kwargs) -> nn.Module:
        return nn.Linear(2, kwargs.get("num_classes", 3))

    assert is_model("tiny_net") and create_model("tiny_net", num_classes=5).out_features == 5

    @register_model(name="tiny_alias")
    def _entry(**kwargs) -> nn.Module:
        return nn.Identity()

    assert "tiny_alias" in list_models("tiny*")
    with pytest.raises(ValueError, match="model 'tiny_net' is already registered"):
        register_model(tiny_net)
    with pytest.raises(ValueError, match="model 'spherenet9' is already registered"):
        register_model(name="spherenet9")(lambda **kw: nn.Identity())


def test_register_model_bad_input(private_registry):
    with pytest.raises(TypeError, match="expects a callable entrypoint; got int"):
        register_model(3)
    with pytest.raises(ValueError, match="model name must be a non-empty str; got ''"):
        register_model(name="")(lambda **kw: nn.Identity())
    with pytest.raises(TypeError, match="pattern must be a str; got int"):
        list_models(3)
