"""ResNet-32 for 32×32 images, as in the LDAM-DRW CIFAR code (He et al. 2016, §4.2).

3 stages × 5 basic blocks at 16 / 32 / 64 channels, option-A shortcuts (stride-2 subsampling
plus zero channel padding: no parameters), global average pooling, a linear head — about
0.46M parameters for 10 classes. The stem takes 1- or 3-channel input. `normed=True` swaps the
head for the cosine ("NormedLinear") classifier LDAM uses, whose logits lie in [-1, 1] and are
scaled by the loss's `s`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.pad = (planes - in_planes) // 2 if (stride != 1 or in_planes != planes) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x
        if self.pad is not None:  # option A: subsample, zero-pad the new channels
            shortcut = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
        return F.relu(out + shortcut)


class NormedLinear(nn.Module):
    """Cosine classifier: logits = normalize(x) · normalize(W) (LDAM-DRW's `use_norm`)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.weight.data.uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) @ F.normalize(self.weight, dim=0)


class ResNetCifar(nn.Module):
    def __init__(self, num_blocks: int = 5, num_classes: int = 10, in_channels: int = 3, normed: bool = False):
        super().__init__()
        self.num_classes, self.in_channels = num_classes, in_channels
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, planes_in = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(num_blocks):
                layers.append(BasicBlock(planes_in, planes, stride if i == 0 else 1))
                planes_in = planes
        self.blocks = nn.Sequential(*layers)
        self.head = NormedLinear(64, num_classes) if normed else nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, 32, 32) -> (B, 64) pooled features."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.blocks(out)  # (B, 64, 8, 8)
        return out.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (B, K)


def resnet32(num_classes: int, in_channels: int = 3, normed: bool = False) -> ResNetCifar:
    return ResNetCifar(5, num_classes, in_channels, normed)


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
