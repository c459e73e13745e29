"""LoRA (Hu et al. 2021) through peft: low-rank adapters on the Linear and convolution layers of the unfrozen stages,
whose own weights then stay fixed; the frozen stages stay frozen (and cached), the head trains whole.

peft's `LoraModel` injects the adapters into our `Net` in place (any module works, image or text), so the training
loop, the feature cache and checkpoints see the same model with a few more tensors. `merged` folds them back into
plain layers: what the registry exports, so a champion serves without peft.
"""
from __future__ import annotations

from torch import nn

from fine_tune.errors import ConfigError

SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def targets(model: nn.Module, frozen: int, patterns: list[str] | None = None) -> list[str]:
    """The full names of the layers LoRA adapts: every Linear and convolution of the stages after the first `frozen`
    (those whose name ends with one of `patterns` when given). Layers inside an nn.MultiheadAttention are left out:
    it reads its projection's weight directly, so an adapter there would change nothing."""
    inside_mha = {f"{name}.{child}" for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)
                  for child, _ in m.named_modules() if child}
    found = []
    for i in range(frozen, len(model.backbone)):
        for name, module in model.backbone[i].named_modules():
            full = f"backbone.{i}.{name}"
            if (isinstance(module, SUPPORTED) and full not in inside_mha
                    and (patterns is None or any(full == p or full.endswith(f".{p}") for p in patterns))):
                found.append(full)
    return found


def _skeleton(arch: str, image_size: int | None = None) -> nn.Module:
    """The architecture alone, built on the meta device: no weights read, none initialised, no memory."""
    import torch

    from fine_tune.learn.models import build_model

    with torch.device("meta"):
        return build_model(arch, 2, image_size=image_size, initialised=False)


def layers_by_stage(arch: str) -> list[list[str]]:
    """The names of the layers LoRA can adapt in each backbone stage of `arch`, relative to the stage."""
    model = _skeleton(arch)
    return [[n.removeprefix(f"backbone.{i}.") for n in targets(model, i) if n.startswith(f"backbone.{i}.")]
            for i in range(len(model.backbone))]


def check(cfg) -> None:
    """Refuse, before anything is written, LoRA that would adapt nothing: for each model a run may get, its unfrozen
    stages at the fewest frozen ones searched must hold a layer `lora_targets` names (models built on the meta
    device: no weights, no time)."""
    if not any(cfg.trial_values("lora_rank")):
        return
    frozen = min(cfg.trial_values("frozen_layers"))
    for variant in cfg.trial_variants():
        model = _skeleton(variant.model, variant.input_size())
        if frozen < len(model.backbone) and not targets(model, frozen, cfg.lora_targets):
            raise ConfigError(_nothing_to_adapt(model, frozen, cfg.lora_targets))


def _nothing_to_adapt(model: nn.Module, frozen: int, patterns: list[str] | None) -> str:
    scope = f"layers named {patterns}" if patterns else "Linear or convolution layers"
    return (f"lora_rank: {model.arch}'s unfrozen stages ({frozen + 1}-{len(model.backbone)}) have no {scope} to "
            "adapt; lower frozen_layers, change lora_targets (`python -m fine_tune models --layers` lists the names), "
            "or set lora_rank: 0")


def adapt(model: nn.Module, rank: int, alpha: float | None, patterns: list[str] | None = None) -> nn.Module:
    """`model` with rank-`rank` adapters on `targets(model, model.frozen, patterns)`; only they and the head train."""
    from peft import LoraConfig
    from peft.tuners.lora import LoraModel

    names = targets(model, model.frozen, patterns)
    if not names:
        raise ConfigError(_nothing_to_adapt(model, model.frozen, patterns))
    # dropout 0: a trial's result then depends on its seed alone, as every other run's does
    LoraModel(model, LoraConfig(r=rank, lora_alpha=alpha or 2 * rank, target_modules=names, lora_dropout=0.0,
                                bias="none"), "default")
    model.head.requires_grad_(True)  # peft marks only the adapters trainable; the new head must learn too
    return model


def merged(model: nn.Module) -> nn.Module:
    """`model` with every adapter folded into its layer's weight (W + B A x alpha / r) and the layer put back as the
    plain module it was: the same function, no peft needed to run it."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]:
        module.merge()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, module.get_base_layer())
    return model


def warm_up() -> None:
    """Import peft now (~1 s and ~80 MB), before a run's time and memory are measured."""
    import peft.tuners.lora  # noqa: F401
