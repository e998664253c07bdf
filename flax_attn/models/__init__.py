"""NNX backbones with an attention slot, torchvision-compatible parameter names, channels-last input.

ResNet family (+ SE / CBAM / any registered block), MobileNetV3, EfficientNet B0-B7, VGG, RegNetX/Y,
and the YOLOv5 n..x detector (:mod:`flax_attn.models.yolo`).
Build by name with :func:`create_model`; import torchvision weights with
:func:`flax_attn.convert.torchvision.from_torchvision`.
"""

from flax_attn.models._common import NamedSequential, Sequential, StochasticDepth
from flax_attn.models.efficientnet import EFFICIENTNET_CONFIGS, EfficientNet, EfficientNetConfig
from flax_attn.models.mobilenetv3 import InvertedResidualConfig, MobileNetV3
from flax_attn.models.regnet import REGNET_CONFIGS, RegNet, RegNetConfig
from flax_attn.models.registry import create_model, list_models, register_model
from flax_attn.models.resnet import BasicBlock, Bottleneck, ResNet
from flax_attn.models.vgg import VGG
from flax_attn.models.yolo import YOLOV5_ANCHORS, YOLOV5_CONFIGS, YOLOv5, yolov5_num_params

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "EFFICIENTNET_CONFIGS",
    "EfficientNet",
    "EfficientNetConfig",
    "InvertedResidualConfig",
    "MobileNetV3",
    "NamedSequential",
    "REGNET_CONFIGS",
    "RegNet",
    "RegNetConfig",
    "ResNet",
    "Sequential",
    "StochasticDepth",
    "VGG",
    "YOLOV5_ANCHORS",
    "YOLOV5_CONFIGS",
    "YOLOv5",
    "create_model",
    "list_models",
    "register_model",
    "yolov5_num_params",
]
