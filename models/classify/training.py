"""Training and evaluation steps of the long-tailed ResNet-32 classifier (no Ray).

Inputs are stored uint8 (B, H, W, C) images, centred on a black `size`×`size` canvas in [−1, 1]
(models/images.py; the recipe's 32 by default, an image's own size for smaller images).
Augmentation is the LDAM-DRW CIFAR recipe — RandomCrop(size, padding 4, black fill) and a
horizontal flip with probability 1/2 — drawn from a passed generator, so a batch's
augmentation is reproducible.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from models.data.images import to_model_space
from models.classify.lt_losses import ClassifierLoss

INPUT_SIZE = 32


def random_crop_flip(x: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Per-image random crop of the (B, C, S, S) batch padded by `padding` (fill −1), then flip."""
    b, _, s, _ = x.shape
    padded = torch.nn.functional.pad(x, (padding,) * 4, value=-1.0)  # (B, C, S+2p, S+2p)
    offsets = torch.randint(0, 2 * padding + 1, (2, b), generator=generator, device=generator.device).to(x.device)
    ar = torch.arange(s, device=x.device)
    rows = (offsets[0][:, None] + ar)[:, :, None]  # (B, S, 1)
    cols = (offsets[1][:, None] + ar)[:, None, :]  # (B, 1, S)
    batch = torch.arange(b, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)  # (B, C, S, S)
    flip = (torch.rand(b, generator=generator, device=generator.device) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], out.flip(-1), out).contiguous()


def to_classifier_input(images: torch.Tensor, augment: bool = False, generator: torch.Generator | None = None,
                        size: int = INPUT_SIZE, channels_last: bool = False) -> torch.Tensor:
    x = to_model_space(images, size)  # (B, C, size, size)
    x = random_crop_flip(x, generator) if augment else x
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@dataclass
class ClassifierState:
    net: torch.nn.Module
    opt: torch.optim.Optimizer
    generator: torch.Generator
    epoch: int = 0  # epochs finished
    input_size: int = INPUT_SIZE  # the canvas the images are centred on
    channels_last: bool = False  # NHWC weights and inputs


def make_classifier_state(net: torch.nn.Module, lr: float, momentum: float, weight_decay: float, seed: int,
                          device: torch.device | str = "cpu", fused: bool = False, input_size: int = INPUT_SIZE,
                          channels_last: bool = False) -> ClassifierState:
    """`fused`: the fused SGD kernel (CUDA only); `channels_last`: NHWC weights (before the
    optimiser is built, so its state has the same layout)."""
    net = net.to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay,
                          **({"fused": True} if fused else {}))
    return ClassifierState(net, opt, torch.Generator().manual_seed(seed), input_size=input_size,
                           channels_last=channels_last)


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def classifier_step(state: ClassifierState, images: torch.Tensor, y: torch.Tensor, loss_fn: ClassifierLoss,
                    epoch: int, augment: bool = True, bf16: bool = False) -> torch.Tensor:
    """One SGD step on a uint8 batch; returns the (detached) loss without a host sync."""
    state.net.train()
    x = to_classifier_input(images, augment, state.generator, state.input_size, state.channels_last)
    autocast = torch.autocast(x.device.type, torch.bfloat16) if bf16 else nullcontext()
    with autocast:
        logits = state.net(x)  # (B, K)
    loss = loss_fn(logits.float(), y, epoch)
    state.opt.zero_grad(set_to_none=True)
    loss.backward()
    state.opt.step()
    return loss.detach()


@torch.no_grad()
def predict(net: torch.nn.Module, images: torch.Tensor, batch_size: int = 1000, bf16: bool = False,
            device: torch.device | str = "cpu", size: int = INPUT_SIZE,
            channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, H, W, C) -> (predicted labels (N,), softmax probabilities (N, K)) on the CPU."""
    net.eval()
    preds, probs = [], []
    for start in range(0, len(images), batch_size):
        x = to_classifier_input(images[start:start + batch_size].to(device), size=size, channels_last=channels_last)
        autocast = torch.autocast(x.device.type, torch.bfloat16) if bf16 else nullcontext()
        with autocast:
            logits = net(x).float()
        p = logits.softmax(dim=1)
        preds.append(p.argmax(dim=1).cpu())
        probs.append(p.cpu())
    if not preds:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, 0)
    return torch.cat(preds), torch.cat(probs)
