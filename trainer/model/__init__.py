"""The model stage: the EfficientNet-Lite0 backbone, its pretrained weights, cached features, fitting and calibration."""
