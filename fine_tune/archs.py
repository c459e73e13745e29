"""What the config knows about each architecture, without importing torch: its name, its stage count, the image size
and channels it takes. `learn/models.py` builds the image models (a test checks the torchvision names against
torchvision itself), `learn/encoders.py` the text ones: `hf:<hub id or folder>`, a Hugging Face encoder."""
from __future__ import annotations

# Our own models: (backbone stages, input channels, the one image size they take).
SMALL = {"simplenet": (2, 1, 28), "cnn": (4, 1, 28)}
TORCHVISION_STAGES = 5
# torchvision families with a stage rule, by name prefix.
FAMILIES = {"resnet": ("resnet", "resnext", "wide_resnet"),
            "features": ("mobilenet", "efficientnet", "convnext", "vgg", "alexnet"),
            "vit": ("vit_",)}
# torchvision 0.29's classification models that follow one of the rules (tests/test_models.py checks the list).
TORCHVISION = (
    "alexnet", "convnext_base", "convnext_large", "convnext_small", "convnext_tiny", "efficientnet_b0",
    "efficientnet_b1", "efficientnet_b2", "efficientnet_b3", "efficientnet_b4", "efficientnet_b5", "efficientnet_b6",
    "efficientnet_b7", "efficientnet_v2_l", "efficientnet_v2_m", "efficientnet_v2_s", "mobilenet_v2",
    "mobilenet_v3_large", "mobilenet_v3_small", "resnet101", "resnet152", "resnet18", "resnet34", "resnet50",
    "resnext101_32x8d", "resnext101_64x4d", "resnext50_32x4d", "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16",
    "vgg16_bn", "vgg19", "vgg19_bn", "vit_b_16", "vit_b_32", "vit_h_14", "vit_l_16", "vit_l_32", "wide_resnet101_2",
    "wide_resnet50_2")
SHOWN = ("simplenet", "cnn", "resnet18", "resnet50", "mobilenet_v3_small", "efficientnet_b0", "vit_b_16",
         "hf:sentence-transformers/all-MiniLM-L6-v2")
HF = "hf:"  # a Hugging Face encoder: embeddings, its blocks in four groups (the last with the pooling): 5 stages
TEXT_STAGES = 5


def is_text(arch: str) -> bool:
    """Whether `arch` is a Hugging Face text encoder (`hf:<hub id or folder>`)."""
    return arch.startswith(HF) and len(arch) > len(HF)


def family(arch: str) -> str | None:
    """The stage rule a torchvision architecture follows, or None."""
    return next((f for f, prefixes in FAMILIES.items() if arch.startswith(prefixes)), None)


def known(arch: str) -> bool:
    return arch in SMALL or arch in TORCHVISION or is_text(arch)


def stage_count(arch: str) -> int:
    return SMALL[arch][0] if arch in SMALL else TEXT_STAGES if is_text(arch) else TORCHVISION_STAGES


def native_size(arch: str) -> int | None:
    """The image size a model takes unless told otherwise: 28 for ours, 224 (ImageNet's) for torchvision's, none for
    a text model."""
    return SMALL[arch][2] if arch in SMALL else None if is_text(arch) else 224


def size_problem(arch: str, size: int | None) -> str | None:
    """Why `arch` cannot take `size` x `size` images (None: its own size), or None."""
    if is_text(arch):
        return None if size is None else f"{arch} is a text model and takes no image_size; remove it"
    size = size or native_size(arch)
    if arch in SMALL and size != SMALL[arch][2]:
        return f"{arch} takes {SMALL[arch][2]}x{SMALL[arch][2]} images only"
    if family(arch) == "vit" and size % int(arch.rsplit("_", 1)[1]):
        return f"{arch} needs an image size divisible by its patch size {arch.rsplit('_', 1)[1]}"
    if size < 16:
        return "images smaller than 16 pixels cannot pass a torchvision model's downsampling"
    return None
