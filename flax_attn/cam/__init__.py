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
    DEFAULT_COMPILE_CACHE_SIZE,
    BaseCAM,
    CacheInfo,
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
    clear_compile_cache,
    compile_cache_info,
    set_compile_cache_size,
)
from flax_attn.cam.detection import (
    BACKWARD_TYPES,
    DetectionCAM,
    DetectionCAMs,
    detection_cams,
    detection_colors,
    draw_detections,
    plot_detection_grid,
    renormalize_in_boxes,
    save_detection_cams,
    save_png,
    show_detection_cams,
)
from flax_attn.cam.engine import AUG_TRANSFORMS, CamResult, check_images, compute_cam, compute_cam_prepared, preflight
from flax_attn.cam.image import jet_colormap, plot_cam_grid, show_cam_on_image
from flax_attn.cam.methods import CamInputs, CamMethod, finer_cam, get_method, list_methods, register_method
from flax_attn.cam.postprocess import aggregate_layers, first_component_projection, resize_maps, scale_cam
from flax_attn.cam.taps import FunctionTap, LinenTap, NNXTap, Tap, make_tap, structural_key
from flax_attn.cam.targets import (
    BinaryClassifierOutputTarget,
    ClassifierOutputReST,
    ClassifierOutputSoftmaxTarget,
    ClassifierOutputTarget,
    FinerWeightedTarget,
    PreparedTargets,
    RawScoresOutputTarget,
    SemanticSegmentationTarget,
    SoftmaxOutputTarget,
    Target,
    normalize_targets,
)

__all__ = [
    "AUG_TRANSFORMS",
    "BACKWARD_TYPES",
    "DEFAULT_COMPILE_CACHE_SIZE",
    "BaseCAM",
    "BinaryClassifierOutputTarget",
    "CacheInfo",
    "CamInputs",
    "CamMethod",
    "CamResult",
    "ClassifierOutputReST",
    "ClassifierOutputSoftmaxTarget",
    "ClassifierOutputTarget",
    "DetectionCAM",
    "DetectionCAMs",
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
    "PreparedTargets",
    "RandomCAM",
    "RawScoresOutputTarget",
    "SemanticSegmentationTarget",
    "ShapleyCAM",
    "SoftmaxOutputTarget",
    "Tap",
    "Target",
    "XGradCAM",
    "aggregate_layers",
    "check_images",
    "clear_compile_cache",
    "compile_cache_info",
    "compute_cam",
    "compute_cam_prepared",
    "detection_cams",
    "detection_colors",
    "draw_detections",
    "finer_cam",
    "first_component_projection",
    "get_method",
    "jet_colormap",
    "list_methods",
    "make_tap",
    "normalize_targets",
    "plot_cam_grid",
    "plot_detection_grid",
    "preflight",
    "register_method",
    "renormalize_in_boxes",
    "resize_maps",
    "save_detection_cams",
    "save_png",
    "scale_cam",
    "set_compile_cache_size",
    "show_cam_on_image",
    "show_detection_cams",
    "structural_key",
]
