"""The model stage: the EfficientNet-Lite0 backbone, its pretrained weights, cached features and fitting."""

from trainer.model.backbone import build_classifier, split
from trainer.model.features import FeatureCache, FeatureExtractor, prefix_fingerprint
from trainer.model.fit import FitConfig, FitResult, fit_suffix, predict_logits
from trainer.model.pretrained import LITE0_PREPROCESS, MODEL_NAME, imagenet_labels, load_lite0

__all__ = [
    "build_classifier",
    "FeatureCache",
    "FeatureExtractor",
    "fit_suffix",
    "FitConfig",
    "FitResult",
    "imagenet_labels",
    "LITE0_PREPROCESS",
    "load_lite0",
    "MODEL_NAME",
    "predict_logits",
    "prefix_fingerprint",
    "split",
]
