"""Key maps of the attention presets of :mod:`flax_attn.layers.registry` (their PyTorch twins' names).

=====================  ======================================  =============================================
preset                 PyTorch twin                            names (Flax -> torch)
=====================  ======================================  =============================================
(generic blocks)       ``torch_ref.blocks``                    identity (``fc1``/``fc2`` Linear, ``conv``...)
``se_classic``         the article's ``SELayer``               ``fc1`` -> ``fc.0``, ``fc2`` -> ``fc.2`` (Linear)
``se_torchvision``     ``torchvision.ops.SqueezeExcitation``   ``fc1``, ``fc2`` as 1x1 ``Conv2d``
``se_mobilenetv3``     (same class, MobileNetV3 widths)        ``fc1``, ``fc2`` as 1x1 ``Conv2d``
``se_efficientnet``    (same class, EfficientNet widths)       ``fc1``, ``fc2`` as 1x1 ``Conv2d``
``se_timm``            ``timm.layers.SEModule``                ``fc1``, ``fc2`` as 1x1 ``Conv2d``
``cbam_timm``          ``timm.layers.cbam.CbamModule``         ``channel.fc1/fc2`` 1x1 conv;
                                                               ``spatial.conv`` -> ``spatial.conv.conv``,
                                                               ``spatial.bn`` -> ``spatial.conv.bn``
``lightcbam_timm``     ``timm.layers.cbam.LightCbamModule``    as ``cbam_timm``
``cbam_official``      ``torch_ref.official_cbam.CBAM``        ``channel.fc1`` -> ``ChannelGate.mlp.1``,
                                                               ``channel.fc2`` -> ``ChannelGate.mlp.3``,
                                                               ``spatial.conv`` -> ``SpatialGate.spatial.conv``,
                                                               ``spatial.bn`` -> ``SpatialGate.spatial.bn``
=====================  ======================================  =============================================
"""

from __future__ import annotations

from flax_attn.convert._keymap import KeyMap, register_key_map

IDENTITY = KeyMap()

SE_CLASSIC = KeyMap({"fc1": "fc.0", "fc2": "fc.2"})
SE_CONV1X1 = KeyMap(conv1x1=("fc1", "fc2"))
CBAM_TIMM = KeyMap({"spatial.conv": "spatial.conv.conv", "spatial.bn": "spatial.conv.bn"},
                   conv1x1=("channel.fc1", "channel.fc2"))
CBAM_OFFICIAL = KeyMap({
    "channel.fc1": "ChannelGate.mlp.1",
    "channel.fc2": "ChannelGate.mlp.3",
    "spatial.conv": "SpatialGate.spatial.conv",
    "spatial.bn": "SpatialGate.spatial.bn",
})

PRESET_KEY_MAPS: dict[str, KeyMap] = {
    # identity: Flax names are the torch names (torch_ref.blocks mirrors them)
    "identity": IDENTITY,
    "se": IDENTITY,
    "cam": IDENTITY,
    "channel_attention": IDENTITY,
    "sam": IDENTITY,
    "spatial_attention": IDENTITY,
    "cbam": IDENTITY,
    # presets
    "se_classic": SE_CLASSIC,
    "se_torchvision": SE_CONV1X1,
    "se_mobilenetv3": SE_CONV1X1,
    "se_efficientnet": SE_CONV1X1,
    "se_timm": SE_CONV1X1,
    "cbam_timm": CBAM_TIMM,
    "lightcbam_timm": CBAM_TIMM,
    "cbam_official": CBAM_OFFICIAL,
}

for _name, _km in PRESET_KEY_MAPS.items():
    register_key_map(_name, _km)
