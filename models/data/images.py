"""Between stored images (uint8, H×W×C) and model space (float, C×S×S in [−1, 1])."""
from __future__ import annotations

import torch


def pad_amounts(height: int, width: int, size: int) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) padding that centres an H×W image in size×size."""
    if height > size or width > size:
        raise ValueError(f"images of {height}x{width} do not fit model.image_size={size}: raise model.image_size")
    top, left = (size - height) // 2, (size - width) // 2
    return left, size - width - left, top, size - height - top


def to_model_space(images: torch.Tensor, size: int, hflip: bool = False,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """uint8 (B, H, W, C) -> float32 (B, C, size, size) in [−1, 1]; padding is black (−1).

    With `hflip`, each image is mirrored with probability 1/2 (draws from `generator`).
    """
    x = images.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)  # (B, C, H, W)
    left, right, top, bottom = pad_amounts(x.shape[2], x.shape[3], size)
    if left or right or top or bottom:
        x = torch.nn.functional.pad(x, (left, right, top, bottom), value=-1.0)
    if hflip:
        flip = torch.rand(x.shape[0], generator=generator, device=generator.device if generator else x.device) < 0.5
        x = torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)
    return x.contiguous()


def to_uint8_images(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """float (B, C, S, S) in [−1, 1] -> uint8 (B, height, width, C), cropping the padding away."""
    left, _, top, _ = pad_amounts(height, width, x.shape[-1])
    x = x[:, :, top:top + height, left:left + width]
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
