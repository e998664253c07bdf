"""NNX backbones with an attention slot, torchvision-compatible parameter names, channels-last input.

ResNet family (+ SE / CBAM / any registered block), MobileNetV3, EfficientNet B0-B7, VGG, RegNetX/Y,
and the YOLOv5 n..x detector (:mod:`flax_attn.models.yolo`).
Build by name with :func:`create_model`; import torchvision weights with
:func:`flax_attn.convert.from_torchvision`.
"""

from flax_attn.models._common import NamedSequential, Sequential, StochasticDepth
from flax_attn.models.efficientnet import EFFICIENTNET_CONFIGS, EfficientNet, EfficientNetConfig
from flax_attn.models.mobilenetv3 import InvertedResidualConfig, MobileNetV3
from flax_attn.models.registry import create_model, list_models, register_model
from flax_attn.models.regnet import REGNET_CONFIGS, RegNet, RegNetConfig
from flax_attn.models.resnet import BasicBlock, Bottleneck, ResNet
from flax_attn.models.vgg import VGG
from flax_attn.models.yolo import YOLOV5_ANCHORS, YOLOV5_CONFIGS, YOLOv5, yolov5_num_params
from flax_attn.models.yolo_loss import YOLOv5LossHyp, yolov5_loss
from flax_attn.models.yolo_metrics import COCO_IOU_THRESHOLDS, COCO_RECALL_THRESHOLDS, DetectionMetrics, detection_map
from flax_attn.models.yolo_ops import (
    Detections,
    NMSResult,
    box_iou,
    letterbox,
    letterbox_boxes,
    nms,
    non_max_suppression,
    scale_boxes,
    xywh2xyxy,
    xyxy2xywh,
)

__all__ = [
    "COCO_IOU_THRESHOLDS",
    "COCO_RECALL_THRESHOLDS",
    "EFFICIENTNET_CONFIGS",
    "REGNET_CONFIGS",
    "VGG",
    "YOLOV5_ANCHORS",
    "YOLOV5_CONFIGS",
    "BasicBlock",
    "Bottleneck",
    "DetectionMetrics",
    "Detections",
    "EfficientNet",
    "EfficientNetConfig",
    "InvertedResidualConfig",
    "MobileNetV3",
    "NMSResult",
    "NamedSequential",
    "RegNet",
    "RegNetConfig",
    "ResNet",
    "Sequential",
    "StochasticDepth",
    "YOLOv5",
    "YOLOv5LossHyp",
    "box_iou",
    "create_model",
    "detection_map",
    "letterbox",
    "letterbox_boxes",
    "list_models",
    "nms",
    "non_max_suppression",
    "register_model",
    "scale_boxes",
    "xywh2xyxy",
    "xyxy2xywh",
    "yolov5_loss",
    "yolov5_num_params",
]
