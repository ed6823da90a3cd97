"""--fast's augmentation: the report's Resize((S, S)) (bilinear), RandomHorizontalFlip()
and RandomRotation(10) (nearest, zero fill), per image, on uint8 batches on the GPU."""
import torch
import torch.nn.functional as F


def draw(generator, n):
    """Per-image draws as RandomHorizontalFlip() and RandomRotation(10) make them: flips
    (bool, p = 0.5) and angles (uniform in [-10, 10] degrees), from `generator` alone."""
    flips = torch.rand(n, generator=generator, device=generator.device) < 0.5
    angles = torch.empty(n, device=generator.device)
    angles.uniform_(-10.0, 10.0, generator=generator)
    return flips, angles


def resize(images, size):
    """uint8 (B, 3, h, w) -> float32 (B, 3, size, size) holding the uint8 levels of PIL's
    Resize((size, size)): bilinear, upscaling (so no antialias)."""
    x = images.float()
    # PIL resamples in two passes, width first, and keeps the image between them as
    # uint8: rounding between the passes, not only at the end, is what keeps its levels.
    # Its fixed-point sums round halves up: floor(x + 0.5), not round-half-even.
    # (Bilinear weights are convex: the levels stay within 0..255, nothing to clamp.)
    x = F.interpolate(x, size=(x.shape[-2], size), mode="bilinear", align_corners=False)
    x = F.interpolate(x.add_(0.5).floor_(), size=(size, size), mode="bilinear",
                      align_corners=False)
    return x.add_(0.5).floor_()


def flip_rotate(images, flips, angles):
    """Levels (B, 3, S, S), each image flipped where `flips` says, then turned by its
    angle about the centre, as PIL's img.transpose(FLIP_LEFT_RIGHT).rotate(angle,
    NEAREST, fillcolor=0): one grid_sample for the batch, no host sync."""
    b, _, h, w = images.shape
    a = torch.deg2rad(angles.to(images.device, torch.float64))
    # PIL samples output pixel (x, y) at input (x0 + c*x + ms*y, y0 + s*x + c*y), pixel
    # edges at integers: the inverse of a counter-clockwise turn on screen (y points down)
    # about (w/2, h/2), walked in 16.16 fixed point from output pixel (0, 0)'s centre and
    # floored (Geometry.c, affine_fixed). Rounding to 1/65536 as it does puts the ~0.1 %
    # of samples within ~0.002 px of a pixel edge on PIL's side of that edge.
    c, s = torch.cos(a), torch.sin(a)
    x0 = _fix(w / 2 + c * (0.5 - w / 2) - s * (0.5 - h / 2))
    y0 = _fix(h / 2 + s * (0.5 - w / 2) + c * (0.5 - h / 2))
    c, s, ms = _fix(c), _fix(s), _fix(-s)
    # The same map between grid_sample's normalised coordinates, g = (2*x + 1)/w - 1,
    # which reads pixel round((g + 1)*w/2 - 1/2); half a fixed-point unit (2**-17 px)
    # keeps that round off ties, so it takes PIL's floor.
    tx = (c * (w - 1) + ms * (h - 1) + 2 * x0 + 2**-16) / w - 1
    ty = (s * (w - 1) + c * (h - 1) + 2 * y0 + 2**-16) / h - 1
    theta = torch.stack([torch.stack([c, ms * h / w, tx], -1),
                         torch.stack([s * w / h, c, ty], -1)], dim=1)
    # Flipping first mirrors where the rotation samples: g_x -> -g_x, pixel k -> w-1-k.
    theta[:, 0] *= 1 - 2 * flips.to(images.device, torch.float64)[:, None]
    # The grid in float64: affine_grid is a matmul, which TF32 (on a GPU) or bf16 (on some
    # CPUs) would round to a few bits, moving samples across pixel edges.
    grid = F.affine_grid(theta, [b, images.shape[1], h, w], align_corners=False)
    return F.grid_sample(images, grid.to(images.dtype), mode="nearest",
                         padding_mode="zeros", align_corners=False)


def _fix(v):
    return torch.floor(v * 65536 + 0.5) / 65536
