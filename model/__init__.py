"""ATMask R-CNN and its Mask R-CNN baseline on torchvision.

>>> from model import ModelConfig, build_model
>>> model = build_model(ModelConfig.for_ablation("atmask", backbone="resnet18", num_classes=3))
"""

from model.binarize import differentiable_binarization
from model.builder import build_model, load_weights
from model.config import ABLATIONS, ConfigError, HeadConfig, ModelConfig
from model.inference import predict_with_maps

__all__ = [
    "ABLATIONS",
    "ConfigError",
    "HeadConfig",
    "ModelConfig",
    "build_model",
    "differentiable_binarization",
    "load_weights",
    "predict_with_maps",
]
