"""Checkpoints (torchsphere.train.checkpoint): atomic writes, safe loading, RNG state, weights round trip."""
from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
from torch import nn

from torchsphere.train import checkpoint as ckpt


def small_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


def leftovers(folder) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_atomic_write_replaces_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "f.bin"
    ckpt.atomic_write_bytes(target, b"one")
    ckpt.atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    assert leftovers(tmp_path) == []


def test_crash_in_the_middle_of_a_write_keeps_the_previous_file(tmp_path):
    target = tmp_path / "f.bin"
    ckpt.atomic_write_bytes(target, b"previous")

    def crashing_writer(f):
        f.write(b"half of the new con")
        raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        ckpt.atomic_write(target, crashing_writer)
    assert target.read_bytes() == b"previous"
    assert leftovers(tmp_path) == []


def test_crash_before_the_rename_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = small_model()
    ckpt.save_checkpoint(tmp_path, model, {"step": 1, "note": "first"})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    def failing_replace(src, dst):
        raise OSError("simulated power loss before rename")

    monkeypatch.setattr(ckpt.os, "replace", failing_replace)
    with pytest.raises(OSError, match="simulated power loss"):
        ckpt.save_checkpoint(tmp_path, model, {"step": 2, "note": "second"})
    monkeypatch.undo()
    restored = small_model()
    state = ckpt.load_checkpoint(tmp_path, restored)
    assert state["step"] == 1 and state["note"] == "first"
    for key, value in restored.state_dict().items():
        assert torch.equal(value, before[key]), key
    ckpt.load_weights(restored, tmp_path / ckpt.MODEL_FILE)  # the weights file is intact too
    for key, value in restored.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert leftovers(tmp_path) == []


def test_checkpoint_loads_with_the_safe_unpickler(tmp_path):
    model = small_model()
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 1, 6, 6)).sum().backward()
    optimizer.step()
    state = {"step": 3, "optimizer": optimizer.state_dict(), "rng": ckpt.rng_state(torch.Generator()),
             "rows": [{"step": 3, "val_acc": 0.5}]}
    ckpt.save_checkpoint(tmp_path, model, state)
    loaded = torch.load(tmp_path / ckpt.STATE_FILE, weights_only=True)  # raises on any pickled custom object
    assert loaded["step"] == 3 and loaded["rows"] == [{"step": 3, "val_acc": 0.5}]
    fresh = torch.optim.Adam(small_model().parameters())
    fresh.load_state_dict(loaded["optimizer"])


def test_rng_state_round_trip():
    generator = torch.Generator().manual_seed(5)
    state = ckpt.rng_state(generator)
    expected = (torch.rand(3), random.random(), np.random.rand(), torch.rand(2, generator=generator))
    torch.manual_seed(123)
    random.seed(1)
    np.random.seed(2)
    generator.manual_seed(9)
    ckpt.set_rng_state(state, generator)
    got = (torch.rand(3), random.random(), np.random.rand(), torch.rand(2, generator=generator))
    assert torch.equal(got[0], expected[0]) and got[1] == expected[1] and got[2] == expected[2]
    assert torch.equal(got[3], expected[3])


def test_weights_round_trip_and_unwrap(tmp_path):
    model = small_model()
    ckpt.save_weights(model, tmp_path / "w.safetensors", metadata={"step": "7"})
    other = small_model()
    ckpt.load_weights(other, tmp_path / "w.safetensors")
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)
    assert ckpt.read_weights_metadata(tmp_path / "w.safetensors") == {"step": "7"}

    class Wrapper(nn.Module):  # what torch.compile returns keeps the module as _orig_mod
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner

    assert ckpt.unwrap(Wrapper(model)) is model


def test_missing_files_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint 'checkpoint.pt' in run folder"):
        ckpt.load_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="weights file .* does not exist"):
        ckpt.load_weights(small_model(), tmp_path / "missing.safetensors")


def test_checkpoint_file_is_fsynced_before_rename(tmp_path, monkeypatch):
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(ckpt.os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(ckpt.os, "replace", lambda a, b: (calls.append("replace"), real_replace(a, b))[1])
    ckpt.atomic_write_bytes(tmp_path / "x", b"data")
    assert calls[:2] == ["fsync", "replace"]
