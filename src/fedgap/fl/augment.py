"""Batched data augmentation on tensors (no torchvision): random shifts and small rotations.

One affine grid per batch: each image gets its own rotation angle and shift drawn from a seeded generator,
and ``grid_sample`` resamples the whole batch in one call, with no Python loop over samples. Pixels shifted in
from outside are copied from the border, which for MNIST-like data is background. The grid moves every channel of
an image alike, so grey and RGB images (any number of channels) go through the same code.

The draw (``affine_theta``) and the resampling (``apply_affine``) are separate so that the vectorized engine can
draw each client's transforms from that client's own generator, exactly as ``random_affine`` would, and then
resample the whole cohort's batch in one call (the resampling is per image, so batching changes no number).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def affine_theta(n: int, h: int, w: int, generator: torch.Generator, max_shift: int = 2,
                 max_degrees: float = 10.0) -> torch.Tensor:
    """``n`` random affine matrices (float32, [n, 2, 3]): a rotation by up to ``max_degrees`` and a shift by up
    to ``max_shift`` pixels of an ``h`` x ``w`` image. Draws n angles, then n x 2 shifts from ``generator``."""
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(max_degrees)
    # affine_grid works in normalized coordinates [-1, 1]: a shift of s pixels is 2 s / size.
    shift = torch.randint(-max_shift, max_shift + 1, (n, 2), generator=generator).float()
    cos, sin = angle.cos(), angle.sin()
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 0, 2] = cos, -sin, shift[:, 0] * 2 / w
    theta[:, 1, 0], theta[:, 1, 1], theta[:, 1, 2] = sin, cos, shift[:, 1] * 2 / h
    return theta


def apply_affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Resample every image of ``x`` ([n, c, h, w], any c) by its own matrix of ``theta`` ([n, 2, 3])."""
    grid = F.affine_grid(theta.to(device=x.device, dtype=x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def random_affine(x: torch.Tensor, generator: torch.Generator, max_shift: int = 2,
                  max_degrees: float = 10.0) -> torch.Tensor:
    n, _, h, w = x.shape
    return apply_affine(x, affine_theta(n, h, w, generator, max_shift, max_degrees))
