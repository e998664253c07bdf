"""flax_attn.cam without torch: jit caching, targets batched by vmap, differentiability, NNX / Linen / function
taps agreeing, the model left untouched, and the errors users get for bad input."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import flax_attn.cam as fc
from flax_attn.layers import CBAM, BatchNorm


class TinyNet(nnx.Module):
    """conv -> BN -> ReLU -> CBAM ("block") -> conv ("layer2") -> mean -> fc."""

    def __init__(self, num_classes=5, *, rngs):
        self.conv1 = nnx.Conv(3, 6, (3, 3), padding=((1, 1), (1, 1)), rngs=rngs)
        self.bn1 = BatchNorm(6, rngs=rngs)
        self.block = CBAM(6, reduction=2, kernel_size=3, rngs=rngs)
        self.layer2 = nnx.Conv(6, 8, (3, 3), strides=2, padding=((1, 1), (1, 1)), rngs=rngs)
        self.fc = nnx.Linear(8, num_classes, rngs=rngs)

    def features(self, x):
        return self.block(jax.nn.relu(self.bn1(self.conv1(x))))

    def head(self, a):
        return self.fc(jnp.tanh(self.layer2(a)).mean((1, 2)))

    def __call__(self, x):
        return self.head(self.features(x))


@pytest.fixture(scope="module")
def net():
    m = TinyNet(rngs=nnx.Rngs(0))
    m.bn1.mean[...] = jax.random.normal(jax.random.key(1), (6,)) * 0.3
    m.bn1.var[...] = jax.random.uniform(jax.random.key(2), (6,)) + 0.5
    m.eval()
    return m


@pytest.fixture(scope="module")
def x():
    return jax.random.normal(jax.random.key(3), (2, 9, 11, 3))


def test_jit_cache_second_call_does_not_recompile(net, x):
    cam = fc.GradCAM(net, target_layers=["block"])
    a = cam(x, [fc.ClassifierOutputTarget(1), fc.ClassifierOutputTarget(2)])
    assert cam.num_traces == 1
    b = cam(x, [fc.ClassifierOutputTarget(3), fc.ClassifierOutputTarget(0)])  # new classes: traced values
    cam(x + 1.0, jnp.array([4, 4]))  # an array of classes is the same target pytree
    assert cam.num_traces == 1
    assert not np.allclose(a, b)
    cam(x[:1], [fc.ClassifierOutputTarget(1)])  # new shape: recompiles
    assert cam.num_traces == 2
    cam(x, None)  # new kind of targets: recompiles
    assert cam.num_traces == 3
    assert a.shape == (2, 9, 11) and a.dtype == jnp.float32


def test_targets_vmap_equals_loop(net, x):
    classes = jnp.array([[0, 3, 4], [2, 1, 1]])
    for cls in (fc.GradCAMPlusPlus, fc.ShapleyCAM):
        cam = cls(net, target_layers=["block", "layer2"])
        both = cam(x, classes)
        assert both.shape == (2, 3, 9, 11)
        for t in range(3):
            np.testing.assert_allclose(both[:, t], cam(x, classes[:, t]), atol=1e-6, rtol=0)


def test_default_target_is_argmax(net, x):
    cam = fc.LayerCAM(net, target_layers=["block"])
    top = jnp.argmax(net(x), -1)
    np.testing.assert_allclose(cam(x), cam(x, top), atol=0, rtol=0)


@pytest.mark.parametrize("method,softmax", [("gradcam", False), ("gradcam++", True)])
def test_differentiable_against_finite_differences(method, softmax):
    """jax.grad of a loss on the normalised CAM equals central differences (float64); the softmax target
    exercises the second-order term (its output cotangent depends on the input)."""
    with jax.enable_x64(True):
        k = jax.random.split(jax.random.key(0), 4)
        w1 = jax.random.normal(k[0], (3, 5), jnp.float64)
        w2 = jax.random.normal(k[1], (5, 4), jnp.float64)
        tap = fc.FunctionTap(lambda x: jnp.tanh(x @ w1), lambda a: jnp.tanh(a @ jnp.ones((5, 5)) * 0.3).mean((1, 2)) @ w2)
        x = jax.random.normal(k[2], (2, 4, 6, 3), jnp.float64)
        wloss = jax.random.normal(k[3], (2, 4, 6), jnp.float64)

        def loss(x):
            tgt = fc.ClassifierOutputSoftmaxTarget(jnp.array([1, 3])) if softmax else jnp.array([1, 3])
            return jnp.sum(fc.compute_cam(tap, x, tgt, method=method).cam * wloss)

        g = jax.grad(loss)(x)
        d = jax.random.normal(jax.random.key(9), x.shape, jnp.float64)
        eps = 1e-6
        fd = (loss(x + eps * d) - loss(x - eps * d)) / (2 * eps)
        assert abs(float(jnp.sum(g * d)) - float(fd)) <= 1e-6 * max(1.0, abs(float(fd)))
        assert float(jnp.abs(g).max()) > 0


def test_gradient_wrt_nnx_parameters_inside_nnx_grad(net, x):
    """An attention-guided loss: CAM inside nnx.grad w.r.t. the model's parameters; model left untouched."""
    before = jax.tree.map(lambda v: np.asarray(v), nnx.state(net))

    @nnx.jit
    def grads(model, x):
        def loss(model):
            cam = fc.compute_cam(fc.make_tap(model, ["block"]), x, jnp.array([1, 2])).cam
            return jnp.mean(cam[:, :4] ** 2)

        return nnx.grad(loss)(model)

    g = grads(net, x)
    flat = jax.tree.leaves(g)
    assert all(np.all(np.isfinite(v)) for v in flat) and max(float(jnp.abs(v).max()) for v in flat) > 0
    after = jax.tree.map(lambda v: np.asarray(v), nnx.state(net))
    jax.tree.map(np.testing.assert_array_equal, before, after)
    assert isinstance(net.block, CBAM)


def test_functional_inside_jit_equals_object_api(net, x):
    f = jax.jit(lambda x: fc.compute_cam(fc.make_tap(net, ["layer2"]), x, jnp.array([1, 0]),
                                         method="gradcam").cam)
    np.testing.assert_allclose(f(x), fc.GradCAM(net, ["layer2"])(x, jnp.array([1, 0])), atol=1e-6, rtol=0)


class LinenTiny(nn.Module):
    @nn.compact
    def __call__(self, x):
        a = jax.nn.relu(nn.Conv(6, (3, 3), padding=((1, 1), (1, 1)), name="conv1")(x))
        a = nn.Conv(8, (3, 3), strides=2, padding=((1, 1), (1, 1)), name="layer2")(a)
        return nn.Dense(5, name="fc")(jnp.tanh(a).mean((1, 2)))


class NNXTiny(nnx.Module):
    def __init__(self, rngs):
        self.conv1 = nnx.Conv(3, 6, (3, 3), padding=((1, 1), (1, 1)), rngs=rngs)
        self.layer2 = nnx.Conv(6, 8, (3, 3), strides=2, padding=((1, 1), (1, 1)), rngs=rngs)
        self.fc = nnx.Linear(8, 5, rngs=rngs)

    def __call__(self, x):
        return self.fc(jnp.tanh(self.layer2(jax.nn.relu(self.conv1(x)))).mean((1, 2)))


@pytest.mark.parametrize("cls", [fc.GradCAM, fc.EigenCAM])
def test_linen_nnx_and_function_taps_agree(x, cls):
    lin = LinenTiny()
    variables = lin.init(jax.random.key(0), x)
    m = NNXTiny(nnx.Rngs(1))
    p = variables["params"]
    for name in ("conv1", "layer2", "fc"):
        getattr(m, name).kernel[...] = p[name]["kernel"]
        getattr(m, name).bias[...] = p[name]["bias"]
    maps = [
        cls(m, target_layers=["layer2"])(x, jnp.array([2, 3])),
        cls((lin, variables), target_layers=["layer2"])(x, jnp.array([2, 3])),
        cls((lambda x: m.layer2(jax.nn.relu(m.conv1(x))), lambda a: m.fc(jnp.tanh(a).mean((1, 2)))))(
            x, jnp.array([2, 3])),
    ]
    for other in maps[1:]:
        np.testing.assert_allclose(other, maps[0], atol=1e-6, rtol=0)
    assert float(maps[0].max()) > 0.5
    with pytest.raises(ValueError, match=r"available paths: \['conv1', 'fc', 'layer2'\]"):
        cls((lin, variables), target_layers=["layer3"])(x)


def test_paths_sequential_list_and_negative_index():
    class Seq(nnx.Module):
        def __init__(self, rngs):
            self.features = nnx.Sequential(nnx.Conv(3, 4, (3, 3), rngs=rngs), jax.nn.relu,
                                           nnx.Conv(4, 4, (3, 3), rngs=rngs))
            self.heads = nnx.List([nnx.Linear(4, 3, rngs=rngs)])

        def __call__(self, x):
            return self.heads[0](self.features(x).mean((1, 2)))

    m = Seq(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (1, 6, 7, 3))
    a = fc.GradCAM(m, ["features.-1"])(x)
    b = fc.GradCAM(m, ["features.2"])(x)
    np.testing.assert_array_equal(a, b)
    assert isinstance(m.features.layers[2], nnx.Conv)  # restored (never replaced in the user's model)
    with pytest.raises(ValueError, match=r"features\.0"):
        fc.GradCAM(m, ["features.7"])


def test_errors(net, x):
    with pytest.raises(ValueError, match=r"available paths: .*block\.channel"):
        fc.GradCAM(net, ["layer9"])
    cam = fc.GradCAM(net, ["block"])
    with pytest.raises(ValueError, match="got 3 targets for a batch of 2"):
        cam(x, [fc.ClassifierOutputTarget(1)] * 3)
    with pytest.raises(ValueError, match="got 3 targets for a batch of 2"):
        cam(x, jnp.array([1, 2, 3]))
    with pytest.raises(ValueError, match=r"out of range.*\[0, 5\)"):
        cam(x, [fc.ClassifierOutputTarget(1), fc.ClassifierOutputTarget(5)])
    with pytest.raises(ValueError, match="out of range"):
        cam(x, jnp.array([[0, -1], [1, 2]]))
    with pytest.raises(ValueError, match="gradient-free"):
        cam(x, fc.SoftmaxOutputTarget())
    with pytest.raises(ValueError, match="same number of targets"):
        cam(x, [[1, 2], [3]])
    with pytest.raises(TypeError, match="same class"):
        cam(x, [fc.ClassifierOutputTarget(1), fc.ClassifierOutputSoftmaxTarget(1)])
    with pytest.raises(ValueError, match=r"channels-last images"):
        cam(jnp.ones((9, 11)))
    with pytest.raises(TypeError, match="floating-point"):
        cam(jnp.ones((2, 9, 11, 3), jnp.int32))
    with pytest.raises(ValueError, match="unknown CAM method"):
        fc.get_method("scorecam")
    with pytest.raises(TypeError, match="flax.nnx.Module"):
        fc.GradCAM(object(), ["block"])
    with pytest.raises(ValueError, match="is random: pass key"):
        fc.compute_cam(fc.make_tap(net, ["block"]), x, method="randomcam")
    with pytest.raises(ValueError, match="image_weight"):
        fc.show_cam_on_image(jnp.zeros((4, 4, 3)), jnp.zeros((4, 4)), image_weight=1.5)
    with pytest.raises(ValueError, match=r"range \[0, 1\]"):
        fc.show_cam_on_image(jnp.full((4, 4, 3), 2.0), jnp.zeros((4, 4)))


def test_segmentation_output_needs_explicit_targets():
    seg = nnx.Conv(3, 4, (1, 1), rngs=nnx.Rngs(0))
    model = nnx.Sequential(nnx.Conv(3, 3, (3, 3), rngs=nnx.Rngs(1)), seg)
    x = jax.random.normal(jax.random.key(0), (2, 5, 6, 3))
    with pytest.raises(ValueError, match="pass targets explicitly"):
        fc.GradCAM(model, ["0"])(x)
    mask = jnp.zeros((5, 6)).at[1:3, 2:5].set(1.0)
    out = fc.GradCAM(model, ["0"])(x, fc.SemanticSegmentationTarget(jnp.array([1, 2]), mask))
    assert out.shape == (2, 5, 6)
    with pytest.raises(ValueError, match="trailing shape"):
        fc.GradCAM(model, ["0"])(x, fc.SemanticSegmentationTarget(jnp.array([1, 2]), jnp.ones((4, 4))))


def test_module_called_twice_is_rejected():
    class Twice(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(3, 3, (3, 3), rngs=rngs)
            self.fc = nnx.Linear(3, 2, rngs=rngs)

        def __call__(self, x):
            return self.fc(self.conv(self.conv(x)).mean((1, 2)))

    with pytest.raises(ValueError, match="called more than once"):
        fc.GradCAM(Twice(nnx.Rngs(0)), ["conv"])(jnp.ones((1, 5, 5, 3)))


def test_model_unchanged_after_exception(net, x):
    def bad_target(o):
        raise RuntimeError("boom")

    block = net.block
    with pytest.raises(RuntimeError, match="boom"):
        fc.GradCAM(net, ["block"])(x, [bad_target, bad_target])
    assert net.block is block and type(net.block) is CBAM
    assert net.bn1.use_running_average is True


def test_constant_map_gives_zeros_not_nan():
    z = fc.scale_cam(jnp.full((2, 3, 4), 0.7))
    assert np.all(np.asarray(z) == 0)
    tap = fc.FunctionTap(lambda x: jnp.ones_like(x), lambda a: a.sum((1, 2, 3))[:, None] * jnp.ones((1, 3)))
    out = fc.compute_cam(tap, jnp.ones((1, 4, 5, 2)), jnp.array([0]))
    assert np.all(np.asarray(out.cam) == 0)


def test_return_raw_and_random(net, x):
    cam = fc.RandomCAM(net, ["block", "layer2"])
    r = cam(x, jnp.array([0, 1]), return_raw=True)
    assert r.cam.shape == (2, 9, 11) and [a.shape for a in r.raw] == [(2, 9, 11), (2, 5, 6)]
    assert r.output.shape == (2, 5)
    r2 = cam(x, jnp.array([0, 1]), return_raw=True)
    assert not np.allclose(r.raw[0], r2.raw[0])  # a fresh key per call
    k = jax.random.key(5)
    np.testing.assert_array_equal(cam(x, key=k), cam(x, key=k))


def test_finercam_and_callables(net, x):
    cam = fc.FinerCAM(net, ["block"])
    a = cam(x)
    b = cam(x, alpha=0.3, comparison_categories=[1, 2])
    assert a.shape == b.shape == (2, 9, 11) and not np.allclose(a, b)
    g = fc.GradCAM(net, ["block"])
    np.testing.assert_allclose(g(x, lambda o: o[3]), g(x, jnp.array([3, 3])), atol=1e-6, rtol=0)
    both = g(x, [[lambda o: o[1], lambda o: o[2] - o[0]]] * 2)
    assert both.shape == (2, 2, 9, 11)


def test_overlays_batched_jitted_and_grid():
    rs = np.random.RandomState(0)
    img, mask = rs.rand(2, 6, 7, 3).astype(np.float32), rs.rand(2, 6, 7).astype(np.float32)
    eager = fc.show_cam_on_image(img, mask, use_rgb=True)
    jitted = jax.jit(lambda i, m: fc.show_cam_on_image(i, m, use_rgb=True))(img, mask)
    assert type(eager) is np.ndarray and eager.dtype == np.uint8 and eager.shape == (2, 6, 7, 3)
    np.testing.assert_array_equal(eager, jitted)
    np.testing.assert_array_equal(fc.show_cam_on_image(img[0], mask[0], use_rgb=True), eager[0])
    bgr = fc.show_cam_on_image(img[0], mask[0], use_rgb=False)
    assert not np.array_equal(bgr, eager[0])
    import matplotlib

    matplotlib.use("Agg")
    fig = fc.plot_cam_grid(img, rs.rand(2, 3, 6, 7), col_titles=["image", "a", "b", "c"])
    assert len(fig.axes) == 8
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_reshape_transform_and_context_manager():
    """Token activations (B, N, C) reshaped to (B, h, w, C) equal the same network tapped as a map."""
    w = jax.random.normal(jax.random.key(0), (4, 3))
    x = jax.random.normal(jax.random.key(1), (2, 3, 5, 4))
    as_map = fc.FunctionTap(jnp.tanh, lambda a: jnp.tanh(a).mean((1, 2)) @ w)
    as_tokens = fc.FunctionTap(lambda x: jnp.tanh(x).reshape(2, 15, 4),
                               lambda t: jnp.tanh(t).mean(1) @ w)
    with fc.GradCAM(as_tokens, reshape_transform=lambda t: t.reshape(t.shape[0], 3, 5, t.shape[-1])) as cam:
        tok = cam(x, jnp.array([0, 2]))
    np.testing.assert_allclose(tok, fc.GradCAM(as_map)(x, jnp.array([0, 2])), atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------------------
# issue 12: compile cache, bad input, grad-cam idioms; issue 8: one method vocabulary
# ------------------------------------------------------------------------------------------------------

def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def _small_tap(scale=1.0):
    w = jnp.linspace(-1.0, 1.0, 12).reshape(4, 3) * scale
    return fc.FunctionTap(jnp.tanh, lambda a: jnp.tanh(a).mean((1, 2)) @ w)


def test_per_call_targets_hit_the_cache_and_memory_stays_bounded(net, x):
    """200 calls, each with freshly built target objects equal in behaviour (Target lists, lambdas rebuilt
    with the same closure values): no recompilation after the first round, RSS growth < 40 MiB (each
    compilation of this model kept ~9 MiB before the cache was keyed structurally)."""
    cam = fc.GradCAM(net, ["block"])

    def targets(i):
        c = i % 3
        if i % 2:
            return [fc.ClassifierOutputTarget(c), fc.ClassifierOutputTarget(c + 1)]
        return [lambda o, c=c: o[c] - o[4]] * 2

    for i in range(6):  # warm-up: every kind of target once
        cam(x, targets(i)).block_until_ready()
    traces, rss0 = fc.compile_cache_info().traces, _rss_mib()
    for i in range(200):
        cam(x, targets(i)).block_until_ready()
    assert fc.compile_cache_info().traces == traces
    assert _rss_mib() - rss0 < 40.0


def test_cache_is_bounded_lru():
    x = jax.random.normal(jax.random.key(0), (1, 4, 5, 4))
    cam = fc.GradCAM(_small_tap())
    def target(c):
        return lambda o: o[c % 3] * (c + 1.0)

    fc.set_compile_cache_size(2)
    try:
        for c in range(4):  # four different closure values: four different keys
            cam(x, target(c))
            assert fc.compile_cache_info().size <= 2
        before = fc.compile_cache_info().traces
        cam(x, target(3))  # the most recent one is still cached
        assert fc.compile_cache_info().traces == before
        cam(x, target(0))  # the oldest one was dropped
        assert fc.compile_cache_info().traces == before + 1
    finally:
        fc.set_compile_cache_size(fc.DEFAULT_COMPILE_CACHE_SIZE)
    assert fc.compile_cache_info().maxsize == fc.DEFAULT_COMPILE_CACHE_SIZE
    with pytest.raises(ValueError, match="maxsize: expected an integer >= 1, got 0"):
        fc.set_compile_cache_size(0)


def test_new_cam_object_on_same_structure_does_not_recompile(net, x):
    first = fc.GradCAM(net, ["block", "layer2"])
    first(x, jnp.array([1, 2]))
    traces = fc.compile_cache_info().traces
    again = fc.GradCAM(net, ["block", "layer2"])
    np.testing.assert_array_equal(again(x, jnp.array([1, 2])), first(x, jnp.array([1, 2])))
    other = TinyNet(rngs=nnx.Rngs(7))  # a new model object with the same structure: new values, same code
    other.eval()
    fc.GradCAM(other, ["block", "layer2"])(x, jnp.array([1, 2]))
    fine = [fc.FinerCAM(net, ["block"]) for _ in range(2)]
    fine[0](x, alpha=0.5)
    t_fine = fc.compile_cache_info().traces
    fine[1](x, alpha=0.5)  # FinerCAM's options are equal by value
    assert again.num_traces == 0 and fine[1].num_traces == 0
    assert fc.compile_cache_info().traces == t_fine == traces + 1
    fc.GradCAM(net, ["layer2"])(x, jnp.array([1, 2]))  # other layers: a new compilation
    assert fc.compile_cache_info().traces == t_fine + 1


def test_empty_batch_and_empty_images_are_named():
    tap = _small_tap()
    for cam in (lambda x: fc.compute_cam(tap, x), fc.GradCAM(tap)):
        with pytest.raises(ValueError, match=r"x: empty batch, got shape \(0, 4, 5, 4\)"):
            cam(jnp.ones((0, 4, 5, 4)))
        with pytest.raises(ValueError, match=r"H, W, C >= 1, got shape \(2, 0, 5, 4\)"):
            cam(jnp.ones((2, 0, 5, 4)))


def test_out_of_range_class_under_jit_is_nan_or_an_error():
    tap = _small_tap()
    x = jax.random.normal(jax.random.key(1), (3, 4, 5, 4))
    traced = jax.jit(lambda x, c: fc.compute_cam(tap, x, c).cam)
    cam = np.asarray(traced(x, jnp.array([3, 1, -1])))  # 3 classes: 3 and -1 are out of range
    assert np.all(np.isnan(cam[0])) and np.all(np.isnan(cam[2]))
    assert np.all(np.isfinite(cam[1])) and cam[1].max() > 0.5
    two = jax.jit(lambda x, c: fc.compute_cam(tap, x, fc.ClassifierOutputSoftmaxTarget(c)).cam)(
        x, jnp.array([[0, 7], [1, 2], [2, 0]]))
    assert np.all(np.isnan(np.asarray(two[0, 1]))) and np.all(np.isfinite(np.asarray(two[1:])))
    with pytest.raises(ValueError, match=r"out of range: got values in \[-1, 1\], expected \[0, 3\)"):
        jax.jit(lambda x: fc.compute_cam(tap, x, [1, -1, 0]).cam)(x)  # concrete under jit: checked eagerly


def test_target_layers_as_module_objects(net, x):
    by_object = fc.GradCAM(net, target_layers=[net.block, net.layer2])
    assert by_object.target_layers == ("block", "layer2")
    np.testing.assert_array_equal(by_object(x, jnp.array([1, 2])),
                                  fc.GradCAM(net, ["block", "layer2"])(x, jnp.array([1, 2])))
    stranger = nnx.Conv(3, 3, (1, 1), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"target_layers\[0\]: this Conv is not a submodule.*'layer4'") as e:
        fc.GradCAM(net, [stranger])
    assert len(str(e.value)) < 400 and "\n" not in str(e.value)
    lin = LinenTiny()
    with pytest.raises(TypeError, match=r"target_layers\[0\].*pass its path string") as e:
        fc.GradCAM((lin, {}), [nn.Dense(3)])
    assert len(str(e.value)) < 300


class LinenBN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = True):
        a = nn.Conv(4, (3, 3), name="conv")(x)
        a = nn.BatchNorm(use_running_average=not train, name="bn")(a)
        return nn.Dense(3, name="fc")(jax.nn.relu(a).mean((1, 2)))


def test_linen_batchnorm_in_train_mode_says_what_to_pass(x):
    m = LinenBN()
    v = m.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"apply_kwargs=\{'train': False\}"):
        fc.GradCAM((m, v), ["conv"])(x)
    assert fc.GradCAM((m, v), ["conv"], apply_kwargs={"train": False})(x).shape == (2, 9, 11)


def test_show_cam_on_image_is_a_numpy_uint8_image():
    from PIL import Image

    rs = np.random.RandomState(1)
    img, mask = rs.rand(5, 7, 3).astype(np.float32), jnp.asarray(rs.rand(5, 7).astype(np.float32))
    out = fc.show_cam_on_image(img, mask, use_rgb=True)
    assert type(out) is np.ndarray and out.dtype == np.uint8 and out.shape == (5, 7, 3)
    np.testing.assert_array_equal(np.asarray(Image.fromarray(out)), out)
    assert type(fc.jet_colormap()) is np.ndarray


def test_methods_list_and_get_agree_and_classes_are_real():
    import inspect

    names = fc.list_methods()
    assert "finercam" in names
    for name in names:
        assert fc.get_method(name).name == name
    assert fc.get_method("finercam", alpha=0.5) == fc.finer_cam(alpha=0.5)
    for cls in (fc.GradCAM, fc.HiResCAM, fc.GradCAMElementWise, fc.GradCAMPlusPlus, fc.XGradCAM, fc.LayerCAM,
                fc.EigenCAM, fc.EigenGradCAM, fc.ShapleyCAM, fc.RandomCAM, fc.FinerCAM):
        assert f"class {cls.__name__}(BaseCAM)" in inspect.getsource(cls)
        assert fc.get_method(cls.method_name).name in names
