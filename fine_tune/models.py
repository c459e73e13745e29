"""SimpleNet (the tutorial's 784-128-64-10 MLP) and a small CNN, each an ordered backbone plus a new head.

`frozen_layers: k` freezes the first k backbone layers: no gradients, and eval mode so normalisation
statistics and dropout inside them stay as pretrained.
"""
from __future__ import annotations

import torch
from torch import nn


def _simplenet_backbone() -> tuple[nn.ModuleList, int]:
    return nn.ModuleList([
        nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU()),  # fc1
        nn.Sequential(nn.Linear(128, 64), nn.ReLU()),  # fc2
    ]), 64


def _cnn_backbone() -> tuple[nn.ModuleList, int]:
    def conv(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                             nn.MaxPool2d(2))

    # 28 -> 14 -> 7 -> 3 spatially; ~93k parameters in all, under the 100k we promise.
    return nn.ModuleList([
        conv(1, 32), conv(32, 64), conv(64, 64),
        nn.Sequential(nn.Flatten(), nn.Dropout(0.25), nn.Linear(64 * 3 * 3, 64), nn.ReLU()),
    ]), 64


BACKBONES = {"simplenet": _simplenet_backbone, "cnn": _cnn_backbone}


def make_head(features: int, num_classes: int, head_size: int) -> nn.Module:
    """A linear head (`head_size=0`) or Linear -> ReLU -> Linear with `head_size` hidden units."""
    if head_size == 0:
        return nn.Linear(features, num_classes)
    return nn.Sequential(nn.Linear(features, head_size), nn.ReLU(), nn.Linear(head_size, num_classes))


class Net(nn.Module):
    def __init__(self, arch: str, num_classes: int, head_size: int = 0):
        super().__init__()
        self.backbone, features = BACKBONES[arch]()
        self.head = make_head(features, num_classes, head_size)
        self.frozen = 0

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Logits; `start=k` takes the output of the first k backbone layers instead of images."""
        for layer in self.backbone[start:]:
            x = layer(x)
        return self.head(x)

    def freeze(self, k: int) -> "Net":
        """Freeze the first k backbone layers."""
        if not 0 <= k <= len(self.backbone):
            raise ValueError(f"frozen_layers={k} but the backbone has {len(self.backbone)} layers")
        self.frozen = k
        for i, layer in enumerate(self.backbone):
            layer.requires_grad_(i >= k)
        return self.train(self.training)

    def train(self, mode: bool = True) -> "Net":
        super().train(mode)
        for layer in self.backbone[: self.frozen]:
            layer.eval()  # frozen layers keep their pretrained BatchNorm statistics and skip dropout
        return self


def build_model(arch: str, num_classes: int, head_size: int = 0, frozen_layers: int = 0) -> Net:
    return Net(arch, num_classes, head_size).freeze(frozen_layers)


def count_params(model: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
