"""Batch augmentation (torchsphere.data.augment): crops against numpy-padded float64 references, flips, generators."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from torchsphere.data import Augment, crop_flip, list_augments, make_augment, random_crop, random_hflip

# numpy's pad modes are the independent reference: "constant" (zeros), "symmetric" (edge repeated), "reflect"
MODES = ("constant", "symmetric", "reflect")


def _padded_reference(x: torch.Tensor, padding: int, mode: str) -> np.ndarray:
    pad = ((0, 0), (0, 0), (padding, padding), (padding, padding))
    return np.pad(x.double().numpy(), pad, mode=mode)


def _crop_offsets(out: torch.Tensor, padded: np.ndarray) -> list[tuple[int, int]]:
    """For each sample, the (dy, dx) whose crop of the padded reference equals it exactly (asserts one exists)."""
    n, _, h, w = out.shape
    offsets = []
    for i in range(n):
        sample = out[i].double().numpy()
        hits = [(dy, dx) for dy in range(padded.shape[2] - h + 1) for dx in range(padded.shape[3] - w + 1)
                if np.array_equal(padded[i, :, dy:dy + h, dx:dx + w], sample)]
        assert hits, f"sample {i} is not a crop of the padded image"
        offsets.append(hits[0])
    return offsets


@pytest.mark.parametrize("mode", MODES)
def test_random_crop_is_a_crop_of_the_padded_image(mode, device):
    x = torch.randn(16, 3, 5, 6, dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    out = random_crop(x.to(device), 2, mode=mode, generator=gen).cpu()
    assert out.shape == x.shape and out.dtype == x.dtype
    _crop_offsets(out, _padded_reference(x, 2, mode))


@pytest.mark.parametrize("mode", MODES)
def test_random_crop_reaches_every_offset(mode):
    # 1-pixel padding of a 4x4 image: 3 x 3 offsets, all of which must occur among 300 samples
    x = torch.rand(300, 1, 4, 4, dtype=torch.float64) + 1.0  # distinct from the zero padding
    out = random_crop(x, 1, mode=mode, generator=torch.Generator().manual_seed(0))
    offsets = _crop_offsets(out, _padded_reference(x, 1, mode))
    assert set(offsets) == {(dy, dx) for dy in range(3) for dx in range(3)}


def test_symmetric_padding_repeats_the_edge_pixel():
    # the official CIFAR-10+ padding: mirror including the edge pixel (TF SYMMETRIC / torchvision "symmetric")
    x = torch.arange(4.0).view(1, 1, 1, 4).expand(1, 1, 4, 4).contiguous()  # each row 0 1 2 3
    out = random_crop(x, 2, mode="symmetric", size=(4, 8), generator=torch.Generator().manual_seed(0))
    # an 8-wide crop of the 8-wide padded row is the whole padded row: 1 0 | 0 1 2 3 | 3 2
    assert out[0, 0, 0].tolist() == [1.0, 0.0, 0.0, 1.0, 2.0, 3.0, 3.0, 2.0]
    out = random_crop(x, 2, mode="reflect", size=(4, 8), generator=torch.Generator().manual_seed(0))
    assert out[0, 0, 0].tolist() == [2.0, 1.0, 0.0, 1.0, 2.0, 3.0, 2.0, 1.0]


def test_constant_padding_is_zero():
    x = torch.full((64, 2, 3, 3), 5.0)
    out = random_crop(x, 3, generator=torch.Generator().manual_seed(0))
    assert set(out.unique().tolist()) <= {0.0, 5.0}
    assert (out == 0).any() and (out == 5).any()
    # zeros come as whole rows/columns shared by all channels
    assert torch.equal(out[:, 0] == 0, out[:, 1] == 0)


def test_random_crop_smaller_size_and_integer_images():
    x = torch.randint(0, 256, (8, 3, 10, 10), dtype=torch.uint8)
    out = random_crop(x, 0, size=(6, 7), generator=torch.Generator().manual_seed(0))
    assert out.shape == (8, 3, 6, 7) and out.dtype == torch.uint8
    _crop_offsets(out, x.numpy().astype(np.float64))


def test_generator_makes_it_reproducible():
    x = torch.randn(32, 3, 8, 8)
    aug = make_augment("cifar10+")
    a = aug(x, torch.Generator().manual_seed(7))
    b = aug(x, torch.Generator().manual_seed(7))
    c = aug(x, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(3)
    d = aug(x, None)
    torch.manual_seed(3)
    assert torch.equal(d, aug(x, None))  # None: the global RNG


def test_cpu_generator_drives_device_batches_identically(device):
    x = torch.randn(16, 3, 8, 8)
    aug = make_augment("cifar10+")
    on_cpu = aug(x, torch.Generator().manual_seed(5))
    on_device = aug(x.to(device), torch.Generator().manual_seed(5))
    assert on_device.device.type == device.type
    assert torch.equal(on_device.cpu(), on_cpu)


def test_random_hflip():
    x = torch.randn(1000, 2, 3, 4)
    out = random_hflip(x, generator=torch.Generator().manual_seed(0))
    flipped = (out == x.flip(-1)).flatten(1).all(1)
    kept = (out == x).flatten(1).all(1)
    assert bool((flipped | kept).all())
    assert 400 < int(flipped.sum()) < 600  # Binomial(1000, 1/2): 10 standard deviations either side
    assert torch.equal(random_hflip(x, 0.0), x)
    assert torch.equal(random_hflip(x, 1.0), x.flip(-1))


def test_registry_entries():
    assert {"none", "flip", "crop_flip", "cifar10+"} <= set(list_augments())
    assert make_augment("cifar10+") == Augment(padding=4, pad_mode="symmetric", flip=True)
    assert make_augment("flip") == Augment(flip=True)
    x = torch.randn(4, 3, 8, 8)
    assert make_augment("none")(x, None) is x
    for name in list_augments():
        out = make_augment(name)(x, torch.Generator().manual_seed(0))
        assert out.shape == x.shape and torch.isfinite(out).all()


def test_cifar10_plus_output_is_a_crop_or_its_mirror():
    x = torch.randn(32, 3, 8, 8, dtype=torch.float64)
    out = make_augment("cifar10+")(x, torch.Generator().manual_seed(0))
    padded = _padded_reference(x, 4, "symmetric")
    for i in range(len(x)):
        sample = out[i].numpy()
        found = any(np.array_equal(padded[i, :, dy:dy + 8, dx:dx + 8], s)
                    for dy in range(9) for dx in range(9) for s in (sample, sample[..., ::-1]))
        assert found, f"sample {i} is neither a crop nor a mirrored crop"


@pytest.mark.parametrize("mode", MODES)
def test_fused_crop_flip_equals_crop_then_flip(mode):
    x = torch.randn(64, 3, 6, 6)
    fused = crop_flip(x, 3, mode=mode, flip_p=0.5, generator=torch.Generator().manual_seed(2))
    gen = torch.Generator().manual_seed(2)
    assert torch.equal(fused, random_hflip(random_crop(x, 3, mode=mode, generator=gen), generator=gen))
    assert torch.equal(Augment(3, mode, True)(x, torch.Generator().manual_seed(2)), fused)


def test_bad_arguments():
    x = torch.randn(2, 1, 4, 4)
    with pytest.raises(ValueError, match="unknown augmentation 'cifar11'.*cifar10\\+"):
        make_augment("cifar11")
    with pytest.raises(ValueError, match="unknown pad mode 'wrap'"):
        random_crop(x, 1, mode="wrap")
    with pytest.raises(ValueError, match="padding must be an int >= 0; got -1"):
        random_crop(x, -1)
    with pytest.raises(ValueError, match="reflect padding needs padding <= 3 .* got 4"):
        random_crop(x, 4, mode="reflect")
    with pytest.raises(ValueError, match="symmetric padding needs padding <= 4 .* got 5"):
        random_crop(x, 5, mode="symmetric")
    with pytest.raises(ValueError, match="crop size"):
        random_crop(x, 0, size=(5, 4))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\); got shape \(4, 4\)"):
        random_hflip(torch.randn(4, 4))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        random_crop(np.zeros((1, 1, 4, 4)), 1)
    with pytest.raises(ValueError, match="p must be a probability in \\[0, 1\\]; got 1.5"):
        random_hflip(x, 1.5)
