"""NNX attention blocks: Squeeze-and-Excitation, CBAM's channel and spatial modules, CBAM, presets."""

from flax_attn.layers._functional import make_divisible
from flax_attn.layers.cbam import CBAM
from flax_attn.layers.channel_attn import ChannelAttention
from flax_attn.layers.norm import BatchNorm
from flax_attn.layers.registry import create_attn, get_attn, list_attn, register_attn
from flax_attn.layers.spatial_attn import SpatialAttention
from flax_attn.layers.squeeze_excite import SqueezeExcite

__all__ = [
    "BatchNorm",
    "CBAM",
    "ChannelAttention",
    "SpatialAttention",
    "SqueezeExcite",
    "create_attn",
    "get_attn",
    "list_attn",
    "make_divisible",
    "register_attn",
]
