"""JAX-native CAM engine: the Grad-CAM family under jit, batched over targets, differentiable.

Familiar to ``pytorch_grad_cam`` users::

    from flax_attn.cam import GradCAM, ClassifierOutputTarget, show_cam_on_image
    cam = GradCAM(model, target_layers=["layer4"])          # nnx module, paths instead of modules
    maps = cam(x, targets=[ClassifierOutputTarget(281)] * len(x))   # (B, H, W), jitted
    maps = cam(x, targets=jnp.array([[281, 282, 285]] * len(x)))    # (B, 3, H, W), one forward pass

and functional (inside your own ``jax.jit``/``jax.grad``)::

    res = compute_cam(make_tap(model, ["layer4"]), x, targets, method="gradcam++")
"""

from flax_attn.cam.api import (
    BaseCAM,
    EigenCAM,
    EigenGradCAM,
    FinerCAM,
    GradCAM,
    GradCAMElementWise,
    GradCAMPlusPlus,
    HiResCAM,
    LayerCAM,
    RandomCAM,
    ShapleyCAM,
    XGradCAM,
)
from flax_attn.cam.engine import AUG_TRANSFORMS, CamResult, compute_cam
from flax_attn.cam.image import jet_colormap, plot_cam_grid, show_cam_on_image
from flax_attn.cam.methods import CamInputs, CamMethod, finer_cam, get_method, list_methods, register_method
from flax_attn.cam.postprocess import aggregate_layers, first_component_projection, resize_maps, scale_cam
from flax_attn.cam.targets import (
    BinaryClassifierOutputTarget,
    ClassifierOutputReST,
    ClassifierOutputSoftmaxTarget,
    ClassifierOutputTarget,
    FinerWeightedTarget,
    RawScoresOutputTarget,
    SemanticSegmentationTarget,
    SoftmaxOutputTarget,
    Target,
    normalize_targets,
)
from flax_attn.cam.taps import FunctionTap, LinenTap, NNXTap, Tap, make_tap

__all__ = [
    "AUG_TRANSFORMS",
    "BaseCAM",
    "BinaryClassifierOutputTarget",
    "CamInputs",
    "CamMethod",
    "CamResult",
    "ClassifierOutputReST",
    "ClassifierOutputSoftmaxTarget",
    "ClassifierOutputTarget",
    "EigenCAM",
    "EigenGradCAM",
    "FinerCAM",
    "FinerWeightedTarget",
    "FunctionTap",
    "GradCAM",
    "GradCAMElementWise",
    "GradCAMPlusPlus",
    "HiResCAM",
    "LayerCAM",
    "LinenTap",
    "NNXTap",
    "RandomCAM",
    "RawScoresOutputTarget",
    "SemanticSegmentationTarget",
    "ShapleyCAM",
    "SoftmaxOutputTarget",
    "Tap",
    "Target",
    "XGradCAM",
    "aggregate_layers",
    "compute_cam",
    "finer_cam",
    "first_component_projection",
    "get_method",
    "jet_colormap",
    "list_methods",
    "make_tap",
    "normalize_targets",
    "plot_cam_grid",
    "register_method",
    "resize_maps",
    "scale_cam",
    "show_cam_on_image",
]
