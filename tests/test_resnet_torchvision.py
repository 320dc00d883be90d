"""resnet18 / resnet34 are torchvision's: the exact state-dict key set, strict loading, the same function.

torchvision is not needed: its key set is written out below from the construction rules of
``torchvision/models/resnet.py`` (pytorch/vision) -- ``conv1`` (7x7, stride 2, no bias), ``bn1``, ``layer{1..4}`` of
``BasicBlock`` (``conv1``/``bn1``/``conv2``/``bn2``; ``downsample = Sequential(conv1x1(stride), BatchNorm2d)`` when
the stride is not 1 or the width changes), ``fc = nn.Linear(512, num_classes)`` with a bias -- and checked against
torchvision's published parameter counts (11,689,512 and 21,797,672). The reference forward is a float64 function
written here with ``torch.nn.functional`` in the order of torchvision's ``ResNet.forward`` / ``BasicBlock.forward``.
"""
from __future__ import annotations

import importlib.util
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, assert_close
from torch import nn

from torchsphere import convert_to_sphere
from torchsphere.models import create_model
from torchsphere.nn import AngularHead, SphereConv2d

BLOCKS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}
TORCHVISION_PARAMS = {"resnet18": 11_689_512, "resnet34": 21_797_672}  # torchvision's model docs
TORCHVISION_BN = dict(eps=1e-5, momentum=0.1)  # nn.BatchNorm2d defaults, which torchvision uses
TINY = dict(width_mult=1 / 16, num_classes=10)  # widths 4 / 8 / 16 / 32


def torchvision_keys(blocks: tuple[int, ...], widths: tuple[int, ...] = (64, 128, 256, 512), num_classes: int = 1000,
                     in_channels: int = 3, fc_bias: bool = True) -> "OrderedDict[str, tuple[int, ...]]":
    """torchvision's ResNet state-dict keys and shapes, in its order (module registration order)."""
    def bn(prefix: str, c: int) -> list[tuple[str, tuple[int, ...]]]:
        return [(f"{prefix}.{k}", (c,)) for k in ("weight", "bias", "running_mean", "running_var")] + [
            (f"{prefix}.num_batches_tracked", ())]

    keys = [("conv1.weight", (widths[0], in_channels, 7, 7)), *bn("bn1", widths[0])]
    c_in = widths[0]
    for i, (n, c) in enumerate(zip(blocks, widths)):
        for j in range(n):
            p, stride = f"layer{i + 1}.{j}", 2 if (i > 0 and j == 0) else 1
            keys += [(f"{p}.conv1.weight", (c, c_in, 3, 3)), *bn(f"{p}.bn1", c),
                     (f"{p}.conv2.weight", (c, c, 3, 3)), *bn(f"{p}.bn2", c)]
            if stride != 1 or c_in != c:
                keys += [(f"{p}.downsample.0.weight", (c, c_in, 1, 1)), *bn(f"{p}.downsample.1", c)]
            c_in = c
    keys += [("fc.weight", (num_classes, widths[-1]))] + ([("fc.bias", (num_classes,))] if fc_bias else [])
    return OrderedDict(keys)


def synthetic_state_dict(keys: "OrderedDict[str, tuple[int, ...]]", dtype: torch.dtype = torch.float32,
                         seed: int = 1) -> "OrderedDict[str, torch.Tensor]":
    """A state dict with torchvision's keys holding non-trivial values: BN affine and running statistics far from
    their initial 1 / 0, a non-zero fc bias, a batch counter; as ``torch.load`` would return it (no metadata)."""
    g = torch.Generator().manual_seed(seed)
    state = OrderedDict()
    for key, shape in keys.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(1234, dtype=torch.long)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=g, dtype=dtype) + 0.5
        elif key.endswith(("bn1.weight", "bn2.weight", "downsample.1.weight")):
            state[key] = torch.rand(shape, generator=g, dtype=dtype) + 0.5
        elif len(shape) == 4:  # conv weights: He-normal scale, so activations stay of order 1
            fan_in = shape[1] * shape[2] * shape[3]
            state[key] = torch.randn(shape, generator=g, dtype=dtype) * (2 / fan_in) ** 0.5
        else:
            state[key] = torch.randn(shape, generator=g, dtype=dtype) * 0.1
    return state


def reference_forward(state: dict[str, torch.Tensor], x: torch.Tensor, blocks: tuple[int, ...],
                      training: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """torchvision's ResNet forward with BasicBlocks, functionally, on a copy of ``state``; returns the logits and
    the state after the forward (running statistics updated in training mode, as nn.BatchNorm2d does)."""
    s = {k: v.clone() for k, v in state.items()}

    def bn(p: str, t: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(t, s[f"{p}.running_mean"], s[f"{p}.running_var"], s[f"{p}.weight"], s[f"{p}.bias"],
                            training, TORCHVISION_BN["momentum"], TORCHVISION_BN["eps"])

    x = F.relu(bn("bn1", F.conv2d(x, s["conv1.weight"], stride=2, padding=3)))
    x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
    for i, n in enumerate(blocks):
        for j in range(n):
            p, stride = f"layer{i + 1}.{j}", 2 if (i > 0 and j == 0) else 1
            out = F.relu(bn(f"{p}.bn1", F.conv2d(x, s[f"{p}.conv1.weight"], stride=stride, padding=1)))
            out = bn(f"{p}.bn2", F.conv2d(out, s[f"{p}.conv2.weight"], padding=1))
            if stride != 1 or x.shape[1] != out.shape[1]:
                x = bn(f"{p}.downsample.1", F.conv2d(x, s[f"{p}.downsample.0.weight"], stride=stride))
            x = F.relu(out + x)
    x = F.adaptive_avg_pool2d(x, 1).reshape(x.shape[0], -1)
    return F.linear(x, s["fc.weight"], s["fc.bias"]), s


def _shapes(model: nn.Module) -> "OrderedDict[str, tuple[int, ...]]":
    return OrderedDict((k, tuple(v.shape)) for k, v in model.state_dict().items())


# ------------------------------------------------------------------------------ the key set, full size
def test_hand_written_key_set_matches_torchvision_counts():
    """The hand-written list reproduces torchvision's published sizes: 122 / 218 entries, 11.69 M / 21.80 M
    parameters (the buffers running_mean, running_var, num_batches_tracked are not parameters)."""
    for name, n_entries in (("resnet18", 122), ("resnet34", 218)):
        keys = torchvision_keys(BLOCKS[name])
        assert len(keys) == n_entries
        buffers = ("running_mean", "running_var", "num_batches_tracked")
        params = sum(torch.Size(s).numel() for k, s in keys.items() if not k.endswith(buffers))
        assert params == TORCHVISION_PARAMS[name]


@pytest.mark.parametrize("name", ["resnet18", "resnet34"])
def test_state_dict_equals_torchvision_key_set_shapes_and_order(name):
    model = create_model(name)
    assert _shapes(model) == torchvision_keys(BLOCKS[name])  # OrderedDict: the order is compared too
    assert list(model.state_dict()) == list(torchvision_keys(BLOCKS[name]))
    assert sum(p.numel() for p in model.parameters()) == TORCHVISION_PARAMS[name]
    assert type(model.fc) is nn.Linear and model.fc.bias is not None and model.default_cfg["head_bias"] is True
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
    assert bns and all(type(m) is nn.BatchNorm2d and (m.eps, m.momentum) == (1e-5, 0.1) and m.affine and
                       m.track_running_stats for m in bns)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(type(m) is nn.Conv2d and m.bias is None for m in convs)
    assert (model.conv1.kernel_size, model.conv1.stride, model.conv1.padding) == ((7, 7), (2, 2), (3, 3))
    assert isinstance(model.maxpool, nn.MaxPool2d) and (model.maxpool.kernel_size, model.maxpool.stride,
                                                         model.maxpool.padding) == (3, 2, 1)
    shortcut = model.layer2[0].downsample
    assert type(shortcut[0]) is nn.Conv2d and shortcut[0].stride == (2, 2) and type(shortcut[1]) is nn.BatchNorm2d


@pytest.mark.parametrize("name", ["resnet18", "resnet34"])
def test_torchvision_state_dict_loads_strictly(name):
    model = create_model(name)
    state = synthetic_state_dict(torchvision_keys(BLOCKS[name]))
    result = model.load_state_dict(state, strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    # a key too many or too few is refused, naming it
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "fc.extra"'):
        model.load_state_dict(OrderedDict(state, **{"fc.extra": torch.zeros(1)}), strict=True)
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "fc.bias"'):
        model.load_state_dict(OrderedDict((k, v) for k, v in state.items() if k != "fc.bias"), strict=True)


def test_state_dict_without_num_batches_tracked_loads_strictly():
    """Files saved before PyTorch 0.4.1 have no num_batches_tracked; BatchNorm fills it in, strict or not."""
    model = create_model("resnet18")
    state = synthetic_state_dict(torchvision_keys(BLOCKS["resnet18"]))
    legacy = OrderedDict((k, v) for k, v in state.items() if not k.endswith("num_batches_tracked"))
    assert len(legacy) == 122 - 20  # 20 BatchNorms
    model.load_state_dict(legacy, strict=True)
    assert torch.equal(model.layer4[1].bn2.running_var, state["layer4.1.bn2.running_var"])


# ------------------------------------------------------------------------------ the same function
@pytest.mark.parametrize("name", ["resnet18", "resnet34"])
@pytest.mark.parametrize("training", [False, True])
def test_loaded_model_computes_torchvision_forward(name, training):
    """Tiny widths, float64: logits equal the functional torchvision reference; in training mode the batch
    statistics, the running-statistics update (momentum 0.1) and the batch counter agree too."""
    blocks = BLOCKS[name]
    widths = (4, 8, 16, 32)
    keys = torchvision_keys(blocks, widths, num_classes=10)
    model = create_model(name, **TINY).to(device=DEVICE, dtype=torch.float64)
    assert _shapes(model) == keys
    state = synthetic_state_dict(keys, torch.float64)
    model.load_state_dict(state, strict=True)
    model.train(training)
    x = torch.randn(3, 3, 37, 45, dtype=torch.float64)  # odd sizes: the stem's and the shortcuts' padding matter
    expected, after = reference_forward(state, x, blocks, training)
    with torch.no_grad():
        logits = model(x.to(DEVICE))
    assert logits.shape == (3, 10)
    assert_close(logits.cpu(), expected)
    new_state = {k: v.cpu() for k, v in model.state_dict().items()}
    for key, value in after.items():
        if key.endswith("num_batches_tracked"):
            assert new_state[key].item() == value.item() + (1 if training else 0), key
        else:
            assert_close(new_state[key], value)
    if training:  # the update really happened, so the comparison above is not trivial
        assert not torch.allclose(new_state["layer1.0.bn1.running_mean"], state["layer1.0.bn1.running_mean"])


# ------------------------------------------------------------------------------ heads and the SphereResNets
def test_head_choices_of_the_torchvision_resnets():
    assert create_model("resnet18", **TINY, head_bias=False).fc.bias is None  # the official score layer on request
    angular = create_model("resnet18", **TINY, head="wsoftmax")
    assert type(angular.fc) is AngularHead and angular.default_cfg["head_bias"] is False
    assert "fc.bias" not in angular.state_dict()
    margin = create_model("resnet34", **TINY, head="gasoftmax", margin=2.0)
    assert type(margin.fc) is AngularHead and margin.fc.margin == 2.0
    with pytest.raises(ValueError, match=r"head_bias applies only to head='softmax'.*got head_bias=True with "
                                         r"head='wsoftmax'"):
        create_model("resnet18", head="wsoftmax", head_bias=True)
    with pytest.raises(TypeError, match="head_bias must be a bool; got str 'yes'"):
        create_model("resnet18", head_bias="yes")
    with pytest.raises(TypeError, match="head_bias must be a bool; got int 1"):
        create_model("sphere_resnet18", head_bias=1)


def test_reset_classifier_keeps_the_bias():
    model = create_model("resnet18", **TINY)
    model.reset_classifier(7)
    assert type(model.fc) is nn.Linear and model.fc.bias.shape == (7,) and torch.equal(model.fc.bias,
                                                                                          torch.zeros(7))
    assert list(model.state_dict())[-2:] == ["fc.weight", "fc.bias"]


@pytest.mark.parametrize("name", ["sphere_resnet18", "sphere_resnet34"])
def test_sphere_resnets_keep_the_bias_free_score_layer(name):
    """Key set: torchvision's without fc.bias. A torchvision state dict loads with strict=False, reporting exactly
    fc.bias; with head_bias=True the SphereResNet has torchvision's key set and loads it strictly."""
    blocks = BLOCKS[name.removeprefix("sphere_")]
    model = create_model(name)
    assert _shapes(model) == torchvision_keys(blocks, fc_bias=False)
    assert model.fc.bias is None and model.default_cfg["head_bias"] is False
    assert all(type(m) is SphereConv2d for n, m in model.named_modules()
               if isinstance(m, nn.Conv2d) and "downsample" not in n)
    state = synthetic_state_dict(torchvision_keys(blocks))
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "fc.bias"'):
        model.load_state_dict(state, strict=True)
    result = model.load_state_dict(state, strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == ["fc.bias"]
    assert torch.equal(model.layer1[0].conv1.weight, state["layer1.0.conv1.weight"])
    biased = create_model(name, head_bias=True)
    assert _shapes(biased) == torchvision_keys(blocks)
    biased.load_state_dict(state, strict=True)


def test_converted_torchvision_resnet_equals_sphere_resnet_with_bias():
    """convert_to_sphere on a loaded resnet18 (shortcuts plain) computes what sphere_resnet18(head_bias=True)
    computes with the same weights, the non-zero fc bias included."""
    keys = torchvision_keys(BLOCKS["resnet18"], (4, 8, 16, 32), num_classes=10)
    state = synthetic_state_dict(keys)
    base = create_model("resnet18", **TINY).to(DEVICE)
    base.load_state_dict(state, strict=True)
    sphere = create_model("sphere_resnet18", **TINY, head_bias=True).to(DEVICE)
    sphere.load_state_dict(state, strict=True)
    converted = convert_to_sphere(base.eval(), "linear", exclude="*.downsample.*")
    x = torch.randn(2, 3, 32, 32).to(DEVICE)
    with torch.no_grad():
        assert_close(converted(x), sphere.eval()(x))
    assert converted.fc.bias is not None and converted.state_dict().keys() == state.keys()


# ------------------------------------------------------------------------------ optional: real torchvision
def _torchvision_or_reason() -> tuple[object | None, str]:
    if importlib.util.find_spec("torchvision") is None:
        return None, "torchvision (optional extra 'vision') is not installed"
    try:
        import torchvision.models
    except Exception as exc:  # torchvision from PyPI does not import beside a mismatched torch build
        return None, f"torchvision is installed but does not import: {type(exc).__name__}: {exc}"
    return torchvision.models, ""


_TV, _TV_REASON = _torchvision_or_reason()


@pytest.mark.skipif(_TV is None, reason=_TV_REASON)
@pytest.mark.parametrize("name", ["resnet18", "resnet34"])
def test_real_torchvision_resnet_round_trip(name):
    reference = getattr(_TV, name)(weights=None).eval()
    assert _shapes(reference) == torchvision_keys(BLOCKS[name])
    model = create_model(name).eval()
    model.load_state_dict(reference.state_dict(), strict=True)
    reference.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert_close(model(x), reference(x))
