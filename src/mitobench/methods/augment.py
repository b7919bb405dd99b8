"""Batched augmentation on uint8 patch tensors, on the training device; no per-image PIL work.

One ``grid_sample`` per batch does the small rotation, the centre-keeping random resized crop, and
the resize to the backbone's input size; the 8 dihedral transforms, colour jitter, HED stain jitter
and blur are tensor operations too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Ruifrok & Johnston stain vectors (rows: haematoxylin, eosin, DAB), as in scikit-image's rgb2hed
_RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)


@dataclass
class AugmentConfig:
    dihedral: bool = True
    rotate_deg: float = 0.0
    crop_scale: tuple[float, float] = (1.0, 1.0)  # fraction of the side kept; the centre always stays in view
    max_shift: float = 0.0  # fraction of the side, bounded so the centre stays inside the crop
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    hed_sigma: float = 0.0  # multiplicative jitter per stain channel
    hed_bias: float = 0.0
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 1.0)


PRESETS = {
    "none": AugmentConfig(dihedral=False),
    "dihedral": AugmentConfig(),
    # the reference code's kind: flips, small rotation, colour jitter, resized crop (kept centred here)
    "paper": AugmentConfig(rotate_deg=15, crop_scale=(0.8, 1.0), brightness=0.1, contrast=0.1, saturation=0.1, hue=0.02),
    "strong": AugmentConfig(rotate_deg=20, crop_scale=(0.75, 1.0), max_shift=0.06, brightness=0.15, contrast=0.15,
                            saturation=0.15, hue=0.03, hed_sigma=0.05, hed_bias=0.02, blur_p=0.2),
}


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th of the 8 dihedral transforms (k in 0..7) of a ``(B, C, H, W)`` batch."""
    if k >= 4:
        x = x.flip(-1)
    return torch.rot90(x, k % 4, dims=(-2, -1))


def random_dihedral(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    ks = torch.randint(0, 8, (x.shape[0],), generator=gen, device="cpu")
    out = torch.empty_like(x)
    for k in range(8):
        sel = (ks == k).nonzero().flatten().to(x.device)
        if len(sel):
            out[sel] = dihedral(x[sel], k)
    return out


def _rand(n: int, lo: float, hi: float, gen: torch.Generator, device) -> torch.Tensor:
    return (torch.rand(n, generator=gen) * (hi - lo) + lo).to(device)


def _per_image_affine(x: torch.Tensor, matrix: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """``out[b, :, y, x] = matrix[b] @ x[b, :, y, x] + offset[b]`` for a ``(B, 3, H, W)`` batch, in one pass
    over the pixels (a batched matrix product with an inner dimension of 3 is slower)."""
    b = x.shape[0]
    pixels = x.permute(0, 2, 3, 1)  # (B, H, W, 3); a view when x is channels-last
    out = pixels[..., 0:1] * matrix[:, None, None, :, 0] + offset.view(b, 1, 1, 3)
    out.addcmul_(pixels[..., 1:2], matrix[:, None, None, :, 1])
    out.addcmul_(pixels[..., 2:3], matrix[:, None, None, :, 2])
    return out.permute(0, 3, 1, 2)


def hed_jitter(x: torch.Tensor, sigma: float, bias: float, gen: torch.Generator) -> torch.Tensor:
    """Scale and shift each stain's optical density (Tellez et al. 2018), batched.

    RGB optical density -> HED, ``hed * alpha + beta``, -> RGB optical density is one affine map per image.
    """
    b = x.shape[0]
    od = x.clamp(min=1e-6).log_().neg_()  # (B, 3, H, W) optical density
    alpha = 1 + _rand(b * 3, -sigma, sigma, gen, x.device).view(b, 3)
    beta = _rand(b * 3, -bias, bias, gen, x.device).view(b, 3)
    hed_from_rgb, rgb_from_hed = _HED_FROM_RGB.to(x), _RGB_FROM_HED.to(x)
    matrix = torch.einsum("cd,bd,de->bec", hed_from_rgb, alpha, rgb_from_hed)  # (B, out, in)
    return _per_image_affine(od, matrix, beta @ rgb_from_hed).neg_().exp_().clamp_(0, 1)


def colour_jitter(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """Brightness, contrast, saturation and hue, composed into one affine colour map per image.

    brightness scales; contrast scales about the image's mean; saturation mixes each pixel with its grey
    value; hue rotates the chroma about the grey axis. The composition is ``M x + (1 - contrast) * mean``,
    because saturation and hue leave grey pixels unchanged.
    """
    b = x.shape[0]
    ones = torch.ones(b)

    def factor(amount: float) -> torch.Tensor:
        return 1 + _rand(b, -amount, amount, gen, "cpu") if amount else ones

    brightness, contrast, saturation = factor(cfg.brightness), factor(cfg.contrast), factor(cfg.saturation)
    eye = torch.eye(3).expand(b, 3, 3)
    grey = torch.tensor([0.299, 0.587, 0.114]).expand(b, 3, 3)
    mix = saturation.view(b, 1, 1) * eye + (1 - saturation).view(b, 1, 1) * grey
    if cfg.hue:
        theta = _rand(b, -cfg.hue, cfg.hue, gen, "cpu") * 2 * math.pi
        cos, sin = torch.cos(theta).view(b, 1, 1), torch.sin(theta).view(b, 1, 1)
        k = 1 / math.sqrt(3)
        cross = torch.tensor([[0, -k, k], [k, 0, -k], [-k, k, 0]])
        mix = (cos * eye + sin * cross + (1 - cos) * torch.full((3, 3), 1 / 3)) @ mix
    matrix = (contrast * brightness).view(b, 1, 1) * mix
    offset = torch.zeros(b, 3)
    if cfg.contrast:
        mean = x.mean(dim=(1, 2, 3)).cpu() * brightness
        offset = torch.einsum("bij,bj->bi", mix, ((1 - contrast) * mean).view(b, 1).expand(b, 3))
    return _per_image_affine(x, matrix.to(x), offset.to(x)).clamp_(0, 1)


def gaussian_blur(x: torch.Tensor, p: float, sigma: tuple[float, float], gen: torch.Generator) -> torch.Tensor:
    b = x.shape[0]
    apply = (torch.rand(b, generator=gen) < p).nonzero().flatten()
    if len(apply) == 0:
        return x
    s = _rand(len(apply), *sigma, gen, "cpu")
    radius = 3
    grid = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernels = torch.exp(-grid[None] ** 2 / (2 * s[:, None] ** 2))
    kernels = (kernels / kernels.sum(1, keepdim=True)).to(x)  # (n, 7)
    sub = x[apply.to(x.device)]
    n, c, h, w = sub.shape
    flat = sub.reshape(1, n * c, h, w)
    kh = kernels.repeat_interleave(c, 0).view(n * c, 1, 1, -1)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="reflect"), kh, groups=n * c)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="reflect"), kh.transpose(-1, -2), groups=n * c)
    x = x.clone()
    x[apply.to(x.device)] = flat.view(n, c, h, w)
    return x


def geometric(x: torch.Tensor, size: int, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """Rotation, centre-keeping crop and resize to ``size`` in one ``grid_sample`` (after an anti-aliased
    shrink when ``size`` is well below the patch, e.g. 64 px from 128)."""
    b = x.shape[0]
    if not cfg.rotate_deg and cfg.crop_scale == (1.0, 1.0) and not cfg.max_shift:
        if x.shape[-1] == size:
            return x
        return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    # grid_sample has no anti-aliasing: shrink first (anti-aliased) so that even the smallest crop still
    # covers at least ``size`` pixels, leaving grid_sample at most crop_max / crop_min of downscaling
    working = math.ceil(size / cfg.crop_scale[0])
    if working < x.shape[-1]:
        x = F.interpolate(x, size=(working, working), mode="bilinear", align_corners=False, antialias=True)
    angle = _rand(b, -cfg.rotate_deg, cfg.rotate_deg, gen, x.device) * math.pi / 180
    scale = _rand(b, *cfg.crop_scale, gen, x.device)
    # The image centre lands at -(R S)^-1 t in output coordinates, |t| / scale from the middle; bounding
    # |t| by scale / 2 keeps the mitosis in the central half of the view whatever the rotation.
    shift = torch.minimum(torch.full_like(scale, cfg.max_shift * 2), (1 - scale).clamp(min=0))
    shift = torch.minimum(shift, scale / (2 * math.sqrt(2)))
    tx = _rand(b, -1, 1, gen, x.device) * shift
    ty = _rand(b, -1, 1, gen, x.device) * shift
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, (b, x.shape[1], size, size), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


class BatchAugment:
    """uint8 ``(B, H, W, 3)`` -> float ``(B, 3, size, size)`` in [0, 1], augmented."""

    def __init__(self, cfg: AugmentConfig, size: int, seed: int = 0):
        self.cfg = cfg
        self.size = size
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch.permute(0, 3, 1, 2).float().div_(255)
        cfg = self.cfg
        if cfg.dihedral:
            x = random_dihedral(x, self.gen)
        if cfg.hed_sigma or cfg.hed_bias:
            x = hed_jitter(x, cfg.hed_sigma, cfg.hed_bias, self.gen)
        if cfg.brightness or cfg.contrast or cfg.saturation or cfg.hue:
            x = colour_jitter(x, cfg, self.gen)
        if cfg.blur_p:
            x = gaussian_blur(x, cfg.blur_p, cfg.blur_sigma, self.gen)
        return geometric(x, self.size, cfg, self.gen)

    def state(self) -> torch.Tensor:
        return self.gen.get_state()

    def set_state(self, state: torch.Tensor) -> None:
        self.gen.set_state(state)
