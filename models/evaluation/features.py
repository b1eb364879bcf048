"""Feature extractors for evaluation, plugged into torch-fidelity.

`inception`: torch-fidelity's inception-v3-compat (the TF-ported weights behind every paper's
FID), from a local weights file or its download. `domain`: a small CNN classifier trained by
the project on the balanced real training set (FID-with-domain-features, the usual practice for
MNIST-like data when Inception is unavailable or ill-suited); its 128-d penultimate layer gives
FID/KID/precision-recall features and its logits give IS. Every number reports its extractor.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DOMAIN_FEATURES = ("128", "logits_unbiased")


class DomainNet(nn.Module):
    """Three conv blocks (32/64/128 channels, two 3×3 convs + BN + ReLU each, 2×2 max-pool),
    global average pool -> 128-d features -> linear classifier. ≈0.29M parameters."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        layers, c = [], in_channels
        for width in (32, 64, 128):
            layers += [nn.Conv2d(c, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                       nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2, ceil_mode=True)]
            c = width
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(128, num_classes)
        self.in_channels, self.num_classes = in_channels, num_classes

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) -> (B, 128)."""
        x = images.float().div(127.5).sub(1.0)
        return self.body(x).mean(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(images))


def train_domain_classifier(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                            *, epochs: int = 3, batch_size: int = 128, lr: float = 2e-3, seed: int = 0,
                            bf16: bool = False):
    """Train on uint8 (N, C, H, W) images; returns (net in eval mode, test accuracy, per-class accuracy).
    `bf16` autocasts the training forward (the features are always extracted in fp32)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    net = DomainNet(train_x.shape[1], num_classes)
    steps = epochs * -(-len(train_y) // batch_size)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(train_y), generator=g)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            with torch.autocast(train_x.device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = net(train_x[idx])
            loss = F.cross_entropy(logits.float(), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    with torch.no_grad():
        pred = torch.cat([net(test_x[i:i + 1024]).argmax(1) for i in range(0, len(test_y), 1024)])
    correct = (pred == test_y).float()
    per_class = [float(correct[test_y == c].mean()) if (test_y == c).any() else float("nan")
                 for c in range(num_classes)]
    return net.requires_grad_(False), float(correct.mean()), per_class


def save_domain_classifier(net: DomainNet, path, **meta) -> None:
    torch.save({"state_dict": net.state_dict(), "in_channels": net.in_channels, "num_classes": net.num_classes,
                **meta}, path)


def load_domain_classifier(path) -> tuple[DomainNet, dict]:
    blob = torch.load(path, map_location="cpu", weights_only=True)
    net = DomainNet(blob["in_channels"], blob["num_classes"])
    net.load_state_dict(blob["state_dict"])
    return net.eval().requires_grad_(False), blob


def domain_extractor_class():
    """A torch-fidelity FeatureExtractorBase subclass for DomainNet weights (imported lazily)."""
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase

    class DomainFeatureExtractor(FeatureExtractorBase):
        def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
            super().__init__(name, features_list)
            if feature_extractor_weights_path is None:
                raise ValueError("the domain feature extractor needs feature_extractor_weights_path")
            self.net, _ = load_domain_classifier(feature_extractor_weights_path)

        @staticmethod
        def get_provided_features_list():
            return DOMAIN_FEATURES

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return {"isc": "logits_unbiased", "fid": "128", "kid": "128", "prc": "128"}[metric]

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return None

        def forward(self, x):
            feats = self.net.features(x)
            out = {"128": feats, "logits_unbiased": self.net.fc(feats)}
            return tuple(out[name] for name in self.features_list)

    return DomainFeatureExtractor


def register_domain_extractor(name: str = "taildiff-domain") -> str:
    """Register DomainNet with torch-fidelity under `name` (idempotent); returns the name."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    if name not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(name, domain_extractor_class())
    return name
