"""PyTorch reference implementations (channels-first), the ground truth of flax-attn's parity suite.

Never imports JAX. Contents:

* :mod:`torch_ref.blocks`: generic ``SqueezeExcite``, ``ChannelAttention``, ``SpatialAttention``, ``CBAM``
  (1-D/2-D/3-D) with the same options and parameter names as ``flax_attn.layers``;
* :mod:`torch_ref.se_layer`: the source article's ``SELayer``;
* :mod:`torch_ref.yolo`: our plain PyTorch YOLOv5 v7.0 (n..x, the package's parameter names, attention slot);
* :mod:`torch_ref.official_cbam`: the official CBAM code (``OfficialCBAM`` here; also importable as
  ``torch_ref.official_cbam.CBAM``).
"""

from torch_ref import official_cbam
from torch_ref.blocks import (
    CBAM,
    ChannelAttention,
    SpatialAttention,
    SqueezeExcite,
    hidden_width,
    make_activation,
    make_divisible,
)
from torch_ref.official_cbam import CBAM as OfficialCBAM
from torch_ref.official_cbam import BasicConv, ChannelGate, ChannelPool, Flatten, SpatialGate, logsumexp_2d
from torch_ref.se_layer import SELayer
from torch_ref.yolo import YOLOv5

__all__ = [
    "BasicConv",
    "CBAM",
    "ChannelAttention",
    "ChannelGate",
    "ChannelPool",
    "Flatten",
    "OfficialCBAM",
    "SELayer",
    "SpatialAttention",
    "SpatialGate",
    "SqueezeExcite",
    "YOLOv5",
    "hidden_width",
    "logsumexp_2d",
    "make_activation",
    "make_divisible",
    "official_cbam",
]
