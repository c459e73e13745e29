"""Every model is an ordered backbone of stages plus a new head: SimpleNet (the tutorial's 784-128-64-10 MLP), a small
CNN, and torchvision's classification architectures (ResNet, MobileNet, EfficientNet, ConvNeXt, VGG, ViT families).

`frozen_layers: k` freezes the first k stages: no gradients, and eval mode so normalisation statistics and dropout
inside them stay as pretrained. The head replaces the architecture's final Linear layer; everything before it is
backbone, so a torchvision model keeps its pretrained pooling and pre-logit layers. Images arrive as uint8 and are
scaled and normalised by the model itself (`Prep`), so the data stay small in memory whatever the model.
"""
from __future__ import annotations


import torch
from torch import nn

from fine_tune.archs import SMALL, TEXT_STAGES, TORCHVISION, TORCHVISION_STAGES, family, is_text, native_size

# Fashion-MNIST's channel statistics, for the models made for it; torchvision's models use ImageNet's, as their
# weights' transforms do.
FASHION_MEAN, FASHION_STD = (0.2860,), (0.3530,)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)



class Prep(nn.Module):
    """uint8 images -> the float input the first stage expects: scaled to [0, 1], grey expanded to the model's three
    channels (or colour averaged to its one), normalised by the training statistics of its family."""

    def __init__(self, channels: int, mean: tuple, std: tuple):
        super().__init__()
        self.channels = channels
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255.0
        if x.shape[1] != self.channels:
            x = x.expand(-1, self.channels, -1, -1) if x.shape[1] == 1 else x.mean(1, keepdim=True)
        return (x - self.mean) / self.std


# --- our own models


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


# --- torchvision's models, cut into stages


class _ViTEmbed(nn.Module):
    """A ViT's patch embedding, class token and position embedding: `VisionTransformer._process_input` and the first
    lines of its encoder, as a stage of its own."""

    def __init__(self, vit):
        super().__init__()
        self.conv_proj, self.class_token = vit.conv_proj, vit.class_token
        self.pos_embedding, self.dropout = vit.encoder.pos_embedding, vit.encoder.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_proj(x)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.dropout(x + self.pos_embedding)


class _ClassToken(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0]


def _chunks(modules: list, n: int) -> list[list]:
    """`modules` cut into n consecutive groups of near-equal length."""
    size = len(modules) / n
    return [modules[round(i * size):round((i + 1) * size)] for i in range(n)]


def torchvision_trunk(arch: str, image_size: int) -> nn.Module:
    """torchvision's model `arch`, untrained (weights are loaded through `weights.py`, checked first)."""
    import torchvision

    if arch not in TORCHVISION:
        raise ValueError(f"model {arch!r} is not one of ours nor a torchvision model with a stage rule here")
    kwargs = {"image_size": image_size} if family(arch) == "vit" else {}
    return torchvision.models.get_model(arch, weights=None, **kwargs)


def _torchvision_backbone(trunk: nn.Module, arch: str) -> tuple[nn.ModuleList, int]:
    """The stages of a torchvision model (its own modules, so its weights go with them) and the width of the
    features its final Linear layer took."""
    fam = family(arch)
    if fam == "resnet":
        stem = nn.Sequential(trunk.conv1, trunk.bn1, trunk.relu, trunk.maxpool)
        last = nn.Sequential(trunk.layer4, trunk.avgpool, nn.Flatten(1))
        return nn.ModuleList([stem, trunk.layer1, trunk.layer2, trunk.layer3, last]), trunk.fc.in_features
    if fam == "vit":
        blocks = _chunks(list(trunk.encoder.layers), TORCHVISION_STAGES - 1)
        stages = [_ViTEmbed(trunk)] + [nn.Sequential(*b) for b in blocks]
        stages[-1] = nn.Sequential(*blocks[-1], trunk.encoder.ln, _ClassToken())
        return nn.ModuleList(stages), trunk.heads.head.in_features
    # features -> avgpool -> (flatten) -> classifier, whose last Linear is what the head replaces
    *kept, final = list(trunk.classifier)
    flatten = [] if any(isinstance(m, nn.Flatten) for m in kept) else [nn.Flatten(1)]
    groups = _chunks(list(trunk.features), TORCHVISION_STAGES)
    stages = [nn.Sequential(*g) for g in groups[:-1]]
    stages.append(nn.Sequential(*groups[-1], trunk.avgpool, *flatten, *kept))
    return nn.ModuleList(stages), final.in_features


def make_head(features: int, num_classes: int, head_size: int) -> nn.Module:
    """A linear head (`head_size=0`) or Linear -> ReLU -> Linear with `head_size` hidden units."""
    if head_size == 0:
        return nn.Linear(features, num_classes)
    return nn.Sequential(nn.Linear(features, head_size), nn.ReLU(), nn.Linear(head_size, num_classes))


class Net(nn.Module):
    """`arch`'s backbone (ordered stages) and a new head for `num_classes` classes."""

    def __init__(self, arch: str, num_classes: int, head_size: int = 0, image_size: int | None = None,
                 trunk_state: dict | None = None, pooling: str = "mean", hub_weights: bool = False,
                 initialised: bool = True):
        """`trunk_state`: torchvision's own weights for its model; `hub_weights`: a text encoder's own weights (else
        the architecture from its config, randomly `initialised` unless a backbone is about to be loaded)."""
        super().__init__()
        self.arch, self.image_size = arch, image_size or native_size(arch)
        if is_text(arch):
            from fine_tune.learn.encoders import Identity, encoder_stages

            self.backbone, features = encoder_stages(arch, pooling, hub_weights, initialised)
            self.prep = Identity()
        elif arch in SMALL:
            self.backbone, features = {"simplenet": _simplenet_backbone, "cnn": _cnn_backbone}[arch]()
            self.prep = Prep(1, FASHION_MEAN, FASHION_STD)
        else:
            trunk = torchvision_trunk(arch, self.image_size)
            if trunk_state is not None:  # torchvision's own weights, keyed as its model is
                trunk.load_state_dict(trunk_state)
            self.backbone, features = _torchvision_backbone(trunk, arch)
            self.prep = Prep(3, IMAGENET_MEAN, IMAGENET_STD)
        self.head = make_head(features, num_classes, head_size)
        self.frozen = 0

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Logits; `start=k` takes the output of the first k backbone stages instead of images."""
        return self.head(self.through(x, start, len(self.backbone)))

    def through(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The output of backbone stages start..stop-1: from uint8 images when start is 0 (a float input at start 0
        has been through `prep` already, see `train.prepared`)."""
        if start == 0 and x.dtype == torch.uint8:
            x = self.prep(x)
        for stage in self.backbone[start:stop]:
            x = stage(x)
        return x

    def freeze(self, k: int) -> "Net":
        """Freeze the first k backbone stages."""
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


def build_model(arch: str, num_classes: int, head_size: int = 0, frozen_layers: int = 0,
                image_size: int | None = None, pooling: str = "mean", initialised: bool = True) -> Net:
    """`initialised=False`: a backbone will overwrite every backbone weight (text encoders skip their random init)."""
    return Net(arch, num_classes, head_size, image_size, pooling=pooling, initialised=initialised).freeze(frozen_layers)


def inference_batch(model: nn.Module, small: int = 2048) -> int:
    """Images per forward pass when nothing is trained: `small` for our small models (fewer, bigger matrix products),
    few enough for a torchvision model's activations to stay in memory."""
    return small if count_params(model, trainable_only=False) < 10**6 else 64


def count_params(model: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def describe(arch: str) -> tuple[int, int | None]:
    """(stages, parameters) of an architecture, the parameters from torchvision's weights metadata when it has
    some (no model is built), else by building it."""
    if family(arch):
        import torchvision

        try:
            return TORCHVISION_STAGES, torchvision.models.get_model_weights(arch).DEFAULT.meta["num_params"]
        except (ValueError, AttributeError, KeyError):
            pass
    stages = TEXT_STAGES if is_text(arch) else SMALL[arch][0]
    return stages, count_params(build_model(arch, 10), trainable_only=False)  # with a head for 10 classes
