"""NNX attention blocks: Squeeze-and-Excitation, CBAM's channel and spatial modules, CBAM, presets.

Each block's options are a frozen spec (:mod:`flax_attn.layers.specs`), presets are named specs.
"""

from flax_attn.layers._functional import make_divisible
from flax_attn.layers.cbam import CBAM
from flax_attn.layers.channel_attn import ChannelAttention
from flax_attn.layers.norm import BatchNorm
from flax_attn.layers.registry import AttnSpec, Preset, create_attn, get_attn, list_attn, register_attn
from flax_attn.layers.spatial_attn import SpatialAttention
from flax_attn.layers.specs import BlockSpec, CBAMSpec, ChannelSpec, SESpec, SpatialSpec
from flax_attn.layers.squeeze_excite import SqueezeExcite

__all__ = [
    "CBAM",
    "AttnSpec",
    "BatchNorm",
    "BlockSpec",
    "CBAMSpec",
    "ChannelAttention",
    "ChannelSpec",
    "Preset",
    "SESpec",
    "SpatialAttention",
    "SpatialSpec",
    "SqueezeExcite",
    "create_attn",
    "get_attn",
    "list_attn",
    "make_divisible",
    "register_attn",
]
