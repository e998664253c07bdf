"""Guided backpropagation (Springenberg et al. 2015) and Guided Grad-CAM (Selvaraju et al. 2017), as grad-cam
1.5.7's ``GuidedBackpropReLUModel``, ``deprocess_image`` and its Guided Grad-CAM usage example.

Guided backprop is the input gradient of a class score in which every ReLU passes back only positive
gradients at positive inputs: ``dx = g * (x > 0) * (g > 0)`` (grad-cam's ``GuidedBackpropReLU``).

How the ReLUs are substituted: the model's forward pass is traced to a jaxpr and re-evaluated by a small
interpreter that replaces every call of ``jax.nn.relu`` (``flax.nnx.relu`` is the same function; our models
and layers use it) by :func:`guided_relu`, a ``jax.custom_vjp`` function, inlining ``jit`` calls on the way.
No module is modified, no global is patched, and any callable works (an NNX module, a function). Limits:

* only ``jax.nn.relu`` is a ReLU here: ``jnp.maximum(x, 0)`` or ``jnp.where(x > 0, x, 0)`` written by hand are
  not substituted (grad-cam likewise replaces only ``torch.nn.ReLU`` modules, not ``F.relu``);
* a ``jax.nn.relu`` inside ``lax.scan`` / ``while_loop`` / ``cond`` / ``remat`` or a custom-gradient function
  raises ``NotImplementedError`` (rather than silently computing a plain gradient); ``relu6`` and other
  activations are not changed (as in grad-cam).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.extend import core as jcore

__all__ = ["GuidedBackpropReLUModel", "deprocess_image", "guided_backprop", "guided_forward", "guided_gradcam",
           "guided_relu"]


@jax.custom_vjp
def guided_relu(x: jax.Array) -> jax.Array:
    """ReLU whose backward pass is guided: ``g * (x > 0) * (g > 0)``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> jax.grad(lambda x: (guided_relu(x) * jnp.array([1.0, -1.0, 1.0])).sum())(jnp.array([1.0, 2.0, -1.0])).tolist()
        [1.0, 0.0, 0.0]
    """
    return jnp.maximum(x, 0)


def _guided_fwd(x):
    return jnp.maximum(x, 0), x


def _guided_bwd(x, g):
    return (jnp.where((x > 0) & (g > 0), g, jnp.zeros_like(g)),)  # +0 where masked, as torch's addcmul


guided_relu.defvjp(_guided_fwd, _guided_bwd)


def _is_relu(eqn: Any) -> bool:
    if eqn.primitive.name != "custom_jvp_call":
        return False
    info = getattr(eqn.params["call_jaxpr"].jaxpr, "debug_info", None)
    src = getattr(info, "func_src_info", None) or ""
    return src.split(" ")[0] == "relu" and "nn/functions.py" in src.replace("\\", "/")


def _subjaxprs(params: dict[str, Any]) -> list[Any]:
    out = []
    for v in params.values():
        for u in (v if isinstance(v, (tuple, list)) else (v,)):
            if isinstance(u, jcore.ClosedJaxpr):
                out.append(u.jaxpr)
            elif isinstance(u, jcore.Jaxpr):
                out.append(u)
    return out


def _contains_relu(jaxpr: Any) -> bool:
    return any(_is_relu(e) or any(_contains_relu(j) for j in _subjaxprs(e.params)) for e in jaxpr.eqns)


def _eval_guided(jaxpr: Any, consts: list[Any], *args: Any) -> list[Any]:
    env: dict[Any, Any] = {}

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    for v, val in zip(jaxpr.constvars, consts):
        env[v] = val
    for v, val in zip(jaxpr.invars, args):
        env[v] = val
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        if _is_relu(eqn):
            outs = [guided_relu(invals[eqn.params["num_consts"]])]
        elif name in ("jit", "pjit", "closed_call") and _contains_relu(eqn.params.get("jaxpr", eqn.params.get(
                "call_jaxpr")).jaxpr):
            cj = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
            outs = _eval_guided(cj.jaxpr, list(cj.consts), *invals)
        elif name == "custom_jvp_call" and _contains_relu(eqn.params["call_jaxpr"].jaxpr):
            cj = eqn.params["call_jaxpr"]  # a custom-JVP function built on relu: its body, guided
            outs = _eval_guided(cj.jaxpr, list(cj.consts), *invals[eqn.params["num_consts"]:])
        else:
            if any(_contains_relu(j) for j in _subjaxprs(eqn.params)):
                raise NotImplementedError(
                    f"guided backprop: a jax.nn.relu inside {name!r} cannot be substituted (only plain and jit "
                    "calls are); restructure the model or use a plain gradient")
            with eqn.ctx.manager:
                outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
            if not eqn.primitive.multiple_results:
                outs = [outs]
        for v, val in zip(eqn.outvars, outs):
            if not isinstance(v, jcore.DropVar):
                env[v] = val
    return [read(v) for v in jaxpr.outvars]


def guided_forward(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` with every ``jax.nn.relu`` replaced by :func:`guided_relu` (differentiate it for guided
    gradients). ``args`` are pytrees of arrays.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> f = lambda x: jax.nn.relu(x) * jnp.array([1.0, -1.0])
        >>> jax.grad(lambda x: guided_forward(f, x).sum())(jnp.array([1.0, 2.0])).tolist()
        [1.0, 0.0]
    """
    flat, tree = jax.tree.flatten(args)
    closed, out_shape = jax.make_jaxpr(lambda *leaves: fn(*jax.tree.unflatten(tree, leaves)),
                                       return_shape=True)(*flat)
    outs = _eval_guided(closed.jaxpr, list(closed.consts), *flat)
    return jax.tree.unflatten(jax.tree.structure(out_shape), outs)


def _classes(target_category: Any, output: jax.Array) -> jax.Array:
    b = output.shape[0]
    if target_category is None:
        return jnp.argmax(output.reshape(b, -1), axis=-1)
    c = jnp.asarray(target_category)
    if not jnp.issubdtype(c.dtype, jnp.integer) or c.ndim > 1 or (c.ndim == 1 and c.shape[0] != b):
        raise ValueError(f"target_category: expected None, an integer or {b} integers (one per image), got "
                         f"{target_category!r}")
    return jnp.broadcast_to(c, (b,))


def guided_backprop(model: Callable[[jax.Array], jax.Array], x: jax.Array, target_category: Any = None) -> jax.Array:
    """Guided-backprop gradients ``(B, H, W, C)`` of ``output[b, target_category[b]]`` w.r.t. channels-last ``x``
    (``None``: each image's arg-max class). ``model``: an NNX module (run on an eval-mode copy) or a function.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> m = nnx.Sequential(nnx.Conv(3, 4, (3, 3), rngs=nnx.Rngs(0)), nnx.relu, lambda a: a.mean((1, 2)))
        >>> guided_backprop(m, jax.random.normal(jax.random.key(0), (2, 8, 8, 3)), 1).shape
        (2, 8, 8, 3)
    """
    x = jnp.asarray(x)
    if x.ndim < 3 or not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x: expected a floating-point channels-last batch (B, H, W, C), got {x.shape} {x.dtype}")
    if isinstance(model, nnx.Module):
        graphdef, state = nnx.split(model)

        def fwd(state, x):
            work = nnx.merge(graphdef, state)
            work.eval()
            return work(x)

        run = lambda xx: guided_forward(fwd, state, xx)  # noqa: E731
    elif callable(model):
        run = lambda xx: guided_forward(model, xx)  # noqa: E731
    else:
        raise TypeError(f"model: expected a flax.nnx.Module or a callable, got {type(model).__name__}")
    output, vjp_fn = jax.vjp(run, x)
    if output.ndim != 2:
        raise ValueError(f"guided backprop needs (B, K) logits, got model output shape {output.shape}")
    cls = _classes(target_category, jax.lax.stop_gradient(output))
    ct = jax.nn.one_hot(cls, output.shape[-1], dtype=output.dtype)
    return vjp_fn(ct)[0]


class GuidedBackpropReLUModel:
    """grad-cam's ``GuidedBackpropReLUModel(model)``: ``gb = gb_model(x, target_category=None)``, jitted.

    Differences from grad-cam: the input is a channels-last batch and the result is ``(B, H, W, C)``, one
    gradient per image (grad-cam returns ``(H, W, C)`` of the first image only: ``gb[0]``); ``target_category``
    may give one class per image. See the module docstring for how ReLUs are found and the limits.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> m = nnx.Sequential(nnx.Conv(3, 4, (3, 3), rngs=nnx.Rngs(0)), nnx.relu, lambda a: a.mean((1, 2)))
        >>> GuidedBackpropReLUModel(m)(jax.random.normal(jax.random.key(0), (1, 8, 8, 3))).shape
        (1, 8, 8, 3)
    """

    def __init__(self, model: Any, device: Any = None):
        if not callable(model):
            raise TypeError(f"model: expected a flax.nnx.Module or a callable, got {type(model).__name__}")
        self.model = model
        if isinstance(model, nnx.Module):
            graphdef, _ = nnx.split(model)
            self._fn = jax.jit(lambda state, x, c: guided_backprop(nnx.merge(graphdef, state), x, c))
        else:
            self._fn = jax.jit(lambda state, x, c: guided_backprop(model, x, c))

    def forward(self, input_img: jax.Array) -> jax.Array:
        return self.model(input_img)

    def __call__(self, input_img: jax.Array, target_category: Any = None) -> jax.Array:
        state = nnx.split(self.model)[1] if isinstance(self.model, nnx.Module) else ()
        x = jnp.asarray(input_img)
        if target_category is not None:
            c = np.asarray(target_category)
            if not np.issubdtype(c.dtype, np.integer) or c.ndim > 1 or (c.ndim == 1 and c.shape[0] != x.shape[0]):
                raise ValueError(f"target_category: expected None, an integer or {x.shape[0]} integers (one per "
                                 f"image), got {target_category!r}")
            target_category = jnp.asarray(c, jnp.int32)
        return self._fn(state, x, target_category)


def deprocess_image(img: Any) -> np.ndarray:
    """grad-cam's ``deprocess_image``: ``uint8(255 * clip(0.5 + 0.1 * (img - mean) / (std + 1e-5), 0, 1))`` over
    the whole array (a numpy result, for display).

    Example:
        >>> deprocess_image(np.array([0.0, 1.0])).tolist()
        [102, 152]
    """
    img = np.asarray(img)
    img = img - np.mean(img)
    img = img / (np.std(img) + 1e-5)
    img = img * 0.1 + 0.5
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def guided_gradcam(grayscale_cam: Any, gb: Any) -> jax.Array:
    """Guided Grad-CAM as grad-cam's usage example (``cam_mask * gb``): the CAM ``(B, H, W)`` (or ``(H, W)``)
    broadcast over the channels of the guided gradients ``(B, H, W, C)``; pass the result to
    :func:`deprocess_image` for display.

    Example:
        >>> import jax.numpy as jnp
        >>> guided_gradcam(jnp.ones((1, 4, 4)), jnp.ones((1, 4, 4, 3))).shape
        (1, 4, 4, 3)
    """
    cam, g = jnp.asarray(grayscale_cam), jnp.asarray(gb)
    if cam.shape != g.shape[:-1]:
        raise ValueError(f"guided_gradcam: the CAM's shape {cam.shape} must equal the gradients' without channels "
                         f"{g.shape[:-1]}")
    return cam[..., None] * g
