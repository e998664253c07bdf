"""YOLOv5 loss parity: :func:`flax_attn.models.yolov5_loss` vs the YOLOv5 7.0 package's ``ComputeLoss``.

The reference is ``yolov5.utils.loss.ComputeLoss(model)`` on the package's own ``Model(yolov5n.yaml)``
(built offline, see ``parity_tests/yolo_ref.py``; its Detect module gives ``na``, ``nc``, ``nl`` and the
anchors in stride units, and ``model.hyp`` the gains). Both sides get the same raw predictions (random
arrays, and the train-mode maps of our yolov5n twin on random weights) and the same targets: several
images, one with no target, boxes at the image edges (``cx = 0`` and ``1``: the cell index is clamped), at
exact half-cell positions (the neighbour rule is ``frac < 0.5``, strict) and just inside them, tiny and
large boxes (some levels match no anchor), and targets that share an (anchor, cell) so the objectness
target keeps the *last* write. Compared: the loss, its three parts and the gradient w.r.t. every map,
float32 on both sides, relative error <= 1e-5 (no float64 needed: measured <= 3e-7 on the loss and parts,
<= 1.3e-7 on the gradients, random-map cases with the default, scaled and all-options gains).
"""

from __future__ import annotations

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from flax_attn.convert import from_yolov5
from flax_attn.models import YOLOv5LossHyp, yolov5_loss
from parity_tests._utils import assert_close, random_input, to_channels_last
from parity_tests.yolo_ref import package_model

_HYP_KEYS = ("box", "obj", "cls", "cls_pw", "obj_pw", "anchor_t", "fl_gamma", "label_smoothing")


@pytest.fixture(scope="module")
def pkg():
    """Package yolov5n models by class count; nc = 5 with random weights and calibrated BN (the twin test
    converts them), the others as initialised (ComputeLoss reads only the Detect module's nl, na, nc, anchors)."""
    cache: dict[int, torch.nn.Module] = {}

    def get(nc: int) -> torch.nn.Module:
        if nc not in cache:
            cache[nc] = package_model("yolov5n", nc=nc, seed=nc, randomize=nc == 5)
        return cache[nc]

    return get


def _compute_loss(pm: torch.nn.Module, hyp: YOLOv5LossHyp):
    from yolov5.utils.loss import ComputeLoss

    pm.hyp = {k: getattr(hyp, k) for k in _HYP_KEYS}
    return ComputeLoss(pm)


def _targets(nc: int, b: int, m: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Padded targets (B, M, 5) + mask with the hard cases of the module docstring; image 1 is empty."""
    rng = np.random.default_rng(seed)
    t = np.zeros((b, m, 5), np.float32)
    valid = np.zeros((b, m), bool)
    t[..., 1:] = rng.uniform(-3, 3, (b, m, 4))       # garbage in the padding rows (must be ignored)
    counts = [m, 0] + [int(rng.integers(1, m + 1)) for _ in range(b - 2)]
    for i, n in enumerate(counts):
        for k in range(n):
            t[i, k] = [rng.integers(nc), *rng.uniform(0.05, 0.95, 2), *rng.uniform(0.02, 0.6, 2)]
            valid[i, k] = True
    r0 = t[0]
    r0[0, 1:] = [0.0, 1.0, 0.1, 0.2]                 # image corner (cells clamped)
    r0[1, 1:] = [1.0, 0.0, 0.3, 0.05]                # the other corner
    r0[2, 1:] = [0.625, 9 / 32, 0.01, 0.015]         # exact half cells on a 16x12 P3 (x 7.5, y 4.5), tiny box
    r0[3, 1:] = [0.625 - 1e-4, 9 / 32 - 1e-4, 0.9, 0.95]  # just below those half cells, huge box
    if m > 5:                                        # a duplicate (anchor, cell): same centre, other size/class
        r0[5] = [(r0[4, 0] + 1) % nc, *r0[4, 1:3], r0[4, 3] * 1.3, r0[4, 4] * 0.8]
    if m > 6:
        r0[6] = [r0[4, 0], r0[4, 1] + 0.01, r0[4, 2] - 0.01, r0[4, 3] * 0.9, r0[4, 4] * 1.2]
    return t, valid


def _torch_rows(t: np.ndarray, valid: np.ndarray) -> torch.Tensor:
    """The package's target format: (n, 6) rows [image, class, cx, cy, w, h] in (image, row) order."""
    rows = [[b, *t[b, k]] for b in range(t.shape[0]) for k in range(t.shape[1]) if valid[b, k]]
    return torch.tensor(np.array(rows, np.float32).reshape(-1, 6))


@functools.cache
def _loss_and_grad(hyp: YOLOv5LossHyp):
    """One jitted value-and-gradient per hyp (cases with equal shapes share the compile: ~5 s CPU each)."""

    def f(ps, t, valid, anchors):
        return yolov5_loss(ps, t, valid, anchors=anchors, hyp=hyp)

    return jax.jit(jax.value_and_grad(f, has_aux=True))


def _compare(pm, hyp, preds: list[np.ndarray], t: np.ndarray, valid: np.ndarray, what: str) -> dict:
    cl = _compute_loss(pm, hyp)
    pt = [torch.tensor(p, requires_grad=True) for p in preds]
    tt = _torch_rows(t, valid)
    ref_loss, ref_parts = cl(pt, tt)
    ref_loss.backward()
    anchors = pm.model[-1].anchors.detach().numpy()

    (loss, parts), grads = _loss_and_grad(hyp)([jnp.asarray(p) for p in preds], jnp.asarray(t), jnp.asarray(valid),
                                               jnp.asarray(anchors))
    assert_close(loss, ref_loss.detach().numpy().reshape(()), 1e-5, f"{what}: loss")
    for k, name in enumerate(("lbox", "lobj", "lcls")):
        assert_close(parts[k], ref_parts[k].numpy(), 1e-5, f"{what}: {name}")
    for level, (g, p) in enumerate(zip(grads, pt)):
        assert_close(g, p.grad.numpy(), 1e-5, f"{what}: d loss / d preds[{level}]")
    return {"cl": cl, "preds": pt, "targets": tt}


def _random_preds(b: int, nc: int, grids=((16, 12), (8, 6), (4, 3)), seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(0, 1.5, (b, 3, ny, nx, 5 + nc)).astype(np.float32) for ny, nx in grids]


def test_loss_parts_and_gradient_on_random_maps(pkg):
    """Random maps, nc = 5, the default (unscaled) gains; also checks that the case is not vacuous: the
    package's match list does contain (image, anchor, cell) duplicates and clamped edge cells."""
    nc, b, m = 5, 3, 7
    t, valid = _targets(nc, b, m, seed=1)
    ref = _compare(pkg(nc), YOLOv5LossHyp(), _random_preds(b, nc), t, valid, "random maps")
    _, _, indices, _ = ref["cl"].build_targets(ref["preds"], ref["targets"])
    dup = [max(collections.Counter(zip(*(v.tolist() for v in idx))).values()) for idx in indices]
    assert max(dup) >= 2, f"no duplicate (image, anchor, cell) in the package's matches: {dup}"
    assert any(int(idx[3].max()) == p.shape[3] - 1 for idx, p in zip(indices, ref["preds"]))


_SCALED = YOLOv5LossHyp.scaled(num_classes=5, img_size=128)


@pytest.mark.parametrize("hyp", [
    _SCALED,
    YOLOv5LossHyp(cls_pw=1.7, obj_pw=0.6, label_smoothing=0.1, anchor_t=2.5, fl_gamma=1.5, box=0.1),
], ids=["scaled", "pos-weights-smoothing-anchor_t-focal"])
def test_loss_hyper_parameters(pkg, hyp):
    """The YOLOv5 train.py scaling, and every other option at once (FocalLoss wraps the pos-weighted BCE)."""
    nc, b, m = 5, 3, 7
    t, valid = _targets(nc, b, m, seed=2)
    _compare(pkg(nc), hyp, _random_preds(b, nc, seed=3), t, valid, f"hyp {hyp}")


def test_single_class_has_no_class_loss(pkg):
    b, m = 3, 5
    t, valid = _targets(1, b, m, seed=4)
    _compare(pkg(1), YOLOv5LossHyp(), _random_preds(b, 1, seed=5), t, valid, "nc = 1")


def test_no_targets_at_all(pkg):
    """Only objectness (tobj = 0 everywhere): the package's ``nt == 0`` branch."""
    nc, b, m = 5, 3, 7
    t = np.random.default_rng(6).uniform(0, 1, (b, m, 5)).astype(np.float32)
    _compare(pkg(nc), YOLOv5LossHyp(), _random_preds(b, nc, seed=7), t, np.zeros((b, m), bool), "no targets")


def test_odd_grid_and_many_duplicates(pkg):
    """Non-square odd grids (a 72x104 input would not exist, the maps are arrays: 9x13 / 5x7 / 3x4), and
    every target of image 0 on the same centre, so each shared cell is written several times."""
    nc, b, m = 5, 2, 6
    t, valid = _targets(nc, b, m, seed=8)
    t[0, :, 1:3] = t[0, 0, 1:3]
    t[0, :, 3:5] = t[0, 0, 3:5] * np.linspace(0.7, 1.4, m, dtype=np.float32)[:, None]
    preds = _random_preds(b, nc, grids=((9, 13), (5, 7), (3, 4)), seed=9)
    _compare(pkg(nc), YOLOv5LossHyp(), preds, t, valid, "odd grids + duplicates")


def test_loss_on_maps_of_our_yolov5n_twin(pkg):
    """The train-mode maps of our yolov5n (weights converted from the package's random ones) at 128x96: the
    anchors of our Detect buffer equal the package's, and the loss of those maps equals the package's."""
    nc, b, m = 5, 3, 7
    pm = pkg(nc)
    model = from_yolov5("yolov5n", pm.state_dict())
    np.testing.assert_array_equal(np.asarray(model.model[24].anchors[...]), pm.model[-1].anchors.numpy())
    model.train()
    x = jnp.asarray(to_channels_last(random_input((b, 3, 128, 96), seed=10)))
    preds = [np.asarray(p) for p in nnx.jit(lambda mod, a: mod(a))(model, x)]
    assert [p.shape for p in preds] == [(b, 3, 16, 12, 10), (b, 3, 8, 6, 10), (b, 3, 4, 3, 10)]
    t, valid = _targets(nc, b, m, seed=11)
    _compare(pm, _SCALED, preds, t, valid, "yolov5n twin maps")
