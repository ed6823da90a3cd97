"""training.augment against the report's own PIL transforms, image by image.

The report resizes each 32x32 CIFAR image with PIL, flips it and rotates it by up to 10
degrees with nearest sampling; --fast does the same to whole uint8 batches on the GPU.
These check that the batch version gives the levels PIL gives, and that it draws its
parameters as torchvision does."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from training.augment import draw, flip_rotate, resize

# Angles the report's RandomRotation(10) can draw, ends and no turn at all included.
ANGLES = [10.0, -10.0, 0.0, 0.5, -0.5, 3.7, -7.3, 9.99, -2.25, 6.1, -4.8, 1.0]


def cifar_like(n):
    """n random 32x32 RGB images: as PIL images and as a uint8 (n, 3, 32, 32) batch."""
    pixels = np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    batch = torch.from_numpy(pixels).permute(0, 3, 1, 2)
    return [Image.fromarray(p) for p in pixels], batch


def levels(pil_images):
    return torch.stack([TF.pil_to_tensor(img) for img in pil_images]).float()


def assert_close_to_pil(ours, pil, what):
    """Levels within a rounding of PIL's, nearly all of them PIL's exactly: resizing in
    one pass, or rotating in exact arithmetic rather than PIL's 16.16 fixed point, would
    still be within 1 level nearly everywhere but change 0.1 % to 25 % of the levels."""
    assert ours.shape == pil.shape, what
    diff = (ours - pil).abs()
    mean, within_1, same = (diff.mean().item(), (diff <= 1).float().mean().item(),
                            (diff == 0).float().mean().item())
    assert mean <= 0.25 and within_1 >= 0.995 and same >= 0.999, (
        f"{what}: mean |diff| {mean:.5f} levels, {within_1:.4%} within 1 level, "
        f"{same:.4%} same")


@pytest.mark.parametrize("size, n", [(224, 24), (64, 36), (1024, 2)])
def test_train_transforms_give_the_levels_of_the_reports_pil_pipeline(size, n):
    assert_train_transforms_close_to_pil(size, n)


def test_tf32_matmuls_leave_the_rotation_exact(monkeypatch):
    """TF32 (on a GPU with "high", which torch.compile's warning invites) keeps 10 bits
    of a float32 mantissa: a float32 sampling grid would move samples across pixel edges.
    A CPU has no TF32: here, float32 grids are rounded as such a GPU would round them."""
    affine_grid, before = F.affine_grid, torch.get_float32_matmul_precision()

    def in_tf32(theta, size, align_corners):
        grid = affine_grid(theta, size, align_corners=align_corners)
        if grid.dtype != torch.float32:  # TF32 rounds float32 matmuls only
            return grid
        return ((grid.view(torch.int32) + 0x1000) & ~0x1FFF).view(torch.float32)
    monkeypatch.setattr(F, "affine_grid", in_tf32)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    torch.set_float32_matmul_precision("high")
    try:
        assert_train_transforms_close_to_pil(224, 24)
    finally:
        torch.set_float32_matmul_precision(before)


def assert_train_transforms_close_to_pil(size, n):
    pil_images, batch = cifar_like(n)
    # Each angle with and without a flip, as far as the images go.
    flips = torch.arange(n) % 2 == 0
    angles = torch.tensor([ANGLES[i // 2 % len(ANGLES)] for i in range(n)])

    ours = flip_rotate(resize(batch, size), flips, angles)

    expected = []
    for img, flip, angle in zip(pil_images, flips.tolist(), angles.tolist()):
        img = TF.resize(img, [size, size])
        img = TF.hflip(img) if flip else img
        img = TF.rotate(img, angle, interpolation=InterpolationMode.NEAREST, fill=0)
        expected.append(img)
    assert ours.dtype == torch.float32
    assert_close_to_pil(ours, levels(expected), f"flip_rotate(resize(x, {size}))")


@pytest.mark.parametrize("size, n", [(224, 24), (64, 36), (1024, 2)])
def test_test_transforms_give_the_levels_of_pil_resize(size, n):
    pil_images, batch = cifar_like(n)
    ours = resize(batch, size)
    assert ours.dtype == torch.float32 and ours.min() >= 0 and ours.max() <= 255
    assert torch.equal(ours, ours.round())
    assert_close_to_pil(ours, levels(TF.resize(img, [size, size]) for img in pil_images),
                        f"resize(x, {size})")


def test_draw_flips_half_and_turns_uniformly_within_10_degrees():
    flips, angles = draw(torch.Generator().manual_seed(0), 100_000)
    assert flips.dtype == torch.bool and flips.shape == (100_000,)
    assert angles.dtype == torch.float32 and angles.shape == (100_000,)
    assert abs(flips.float().mean().item() - 0.5) <= 0.01
    assert -10 <= angles.min() < -9.9 and 9.9 < angles.max() <= 10
    assert abs(angles.mean().item()) <= 0.1
    # Uniform: each 2-degree bin holds a tenth of the draws.
    tenths = torch.histc(angles, bins=10, min=-10, max=10) / 100_000
    assert torch.all((tenths - 0.1).abs() <= 0.01), tenths


def test_draw_is_the_generators_alone():
    first, again, other = (draw(torch.Generator().manual_seed(seed), 1000)
                           for seed in (1, 1, 2))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0]) and not torch.equal(first[1], other[1])
