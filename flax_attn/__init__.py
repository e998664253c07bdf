"""flax-attn: SE / CBAM attention blocks for Flax, a JAX-native Grad-CAM family, and a PyTorch parity suite."""

from flax_attn.layers import (
    CBAM,
    BatchNorm,
    CBAMSpec,
    ChannelAttention,
    ChannelSpec,
    SESpec,
    SpatialAttention,
    SpatialSpec,
    SqueezeExcite,
    create_attn,
    get_attn,
    list_attn,
    make_divisible,
    register_attn,
)

__version__ = "0.1.0"

__all__ = [
    "CBAM",
    "BatchNorm",
    "CBAMSpec",
    "ChannelAttention",
    "ChannelSpec",
    "SESpec",
    "SpatialAttention",
    "SpatialSpec",
    "SqueezeExcite",
    "__version__",
    "create_attn",
    "get_attn",
    "list_attn",
    "make_divisible",
    "register_attn",
]

# Sub-packages, importable as attributes (``flax_attn.cam.GradCAM``); none of them imports torch.
from flax_attn import cam, convert, layers, linen, models

__all__ += ["cam", "convert", "layers", "linen", "models"]
