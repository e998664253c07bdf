"""Datasets (all in memory, deterministic given the seeds) and the device-feeding batch pipeline.

* ``digits``: scikit-learn's bundled handwritten digits (1,797 real 8x8 images, no download).
* ``cluttered_digits``: each image is one digit (scaled up) placed at a random position on a larger canvas
  (64x64 by default) among fragments cut from other digits, after "cluttered MNIST" (Mnih et al., 2014).
  The ground-truth box of the target digit is kept for every image (for the CAM localisation score).
  Train and validation images are built from disjoint sets of source digits.
* ``folder``: ``data_dir/<class>/<image>``; decoded with PIL; unreadable files are reported and skipped.

The train/validation split is fixed by ``data_seed`` (independent of the training ``seed``). The data order
is a pure function of ``(seed, step)``: epoch ``e`` uses the permutation drawn from ``(seed, e)``, so a run
resumed at step ``s`` sees exactly the batches an uninterrupted run sees.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from train.config import Config

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


@dataclass(frozen=True)
class Dataset:
    """Images ``(N, H, W, C)`` float32 in [0, 1], labels ``(N,)`` int32, optional boxes ``(N, 4)`` int32 as
    ``(top, left, bottom, right)`` with exclusive bottom/right, in pixels of the image."""

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    boxes: np.ndarray | None = None
    skipped: tuple[str, ...] = ()

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def take(self, idx: np.ndarray) -> Dataset:
        return dataclasses.replace(self, images=self.images[idx], labels=self.labels[idx],
                                   boxes=None if self.boxes is None else self.boxes[idx])


# --------------------------------------------------------------------------------------------------
# sources
# --------------------------------------------------------------------------------------------------

def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int32)


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of one (h, w) float image to (size, size) with PIL (float mode)."""
    from PIL import Image

    if img.shape == (size, size):
        return img.astype(np.float32)
    out = np.asarray(Image.fromarray(img.astype(np.float32), mode="F").resize((size, size), Image.BILINEAR))
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng([seed, 12345]).permutation(n)
    n_val = max(1, int(round(n * val_fraction)))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def load_digits(config: Config) -> tuple[Dataset, Dataset]:
    images, labels = _sklearn_digits()
    size = config.image_size or 8
    if size != 8:
        images = np.stack([_resize(im, size) for im in images])
    ds = Dataset(images[..., None], labels, tuple(str(i) for i in range(10)))
    tr, va = _split(len(ds), config.val_fraction, config.data_seed)
    return ds.take(tr), ds.take(va)


def make_cluttered_digits(digits: np.ndarray, labels: np.ndarray, num: int, *, canvas: int = 64,
                          clutter: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Builds ``num`` cluttered images from source ``digits`` ``(n, h, w)`` in [0, 1].

    The target digit is scaled to a side drawn from [0.3, 0.42] x ``canvas`` and pasted at a uniformly random
    position; ``clutter`` fragments (random crops, about a third of a digit's side, of *other* source digits at
    the same scales) are pasted at random positions; pixels combine with ``max``. The digit's placement uses
    its own random stream, so ``clutter=0`` gives the same digits at the same places, without clutter.

    Returns ``images (num, canvas, canvas)`` float32, ``labels (num,)`` int32 and ``boxes (num, 4)`` int32
    ``(top, left, bottom, right)``, the tight box (exclusive end) of the target digit's non-zero pixels.
    """
    if canvas < 16:
        raise ValueError(f"cluttered digits need a canvas of at least 16 pixels, got {canvas}")
    n = digits.shape[0]
    rng_digit = np.random.default_rng([seed, 1])
    rng_clutter = np.random.default_rng([seed, 2])
    sizes = np.arange(int(round(0.30 * canvas)), int(round(0.42 * canvas)) + 1)
    cache: dict[tuple[int, int], np.ndarray] = {}

    def scaled(i: int, s: int) -> np.ndarray:
        if (i, s) not in cache:
            cache[(i, s)] = _resize(digits[i], int(s))
        return cache[(i, s)]

    frag = max(2, int(round(sizes.mean() / 3)))
    images = np.zeros((num, canvas, canvas), np.float32)
    out_labels = np.zeros((num,), np.int32)
    boxes = np.zeros((num, 4), np.int32)
    for k in range(num):
        i = int(rng_digit.integers(n))
        s = int(rng_digit.choice(sizes))
        top, left = (int(v) for v in rng_digit.integers(0, canvas - s + 1, size=2))
        img = images[k]
        for _ in range(clutter):
            j = int(rng_clutter.integers(n - 1))
            j += j >= i  # never the target digit itself
            sj = scaled(j, int(rng_clutter.choice(sizes)))
            cy, cx = (int(v) for v in rng_clutter.integers(0, sj.shape[0] - frag + 1, size=2))
            py, px = (int(v) for v in rng_clutter.integers(0, canvas - frag + 1, size=2))
            np.maximum(img[py:py + frag, px:px + frag], sj[cy:cy + frag, cx:cx + frag],
                       out=img[py:py + frag, px:px + frag])
        d = scaled(i, s)
        np.maximum(img[top:top + s, left:left + s], d, out=img[top:top + s, left:left + s])
        rows, cols = np.nonzero(d.any(axis=1))[0], np.nonzero(d.any(axis=0))[0]
        boxes[k] = (top + rows[0], left + cols[0], top + rows[-1] + 1, left + cols[-1] + 1)
        out_labels[k] = labels[i]
    return images, out_labels, boxes


def load_cluttered_digits(config: Config) -> tuple[Dataset, Dataset]:
    digits, labels = _sklearn_digits()
    tr, va = _split(len(labels), config.val_fraction, config.data_seed)
    canvas = config.image_size or 64
    names = tuple(str(i) for i in range(10))
    out = []
    for part, idx, num in ((1, tr, config.cluttered_train), (2, va, config.cluttered_val)):
        im, lb, bx = make_cluttered_digits(digits[idx], labels[idx], num, canvas=canvas, clutter=config.clutter,
                                           seed=config.data_seed * 1000 + part)
        out.append(Dataset(im[..., None], lb, names, bx))
    return out[0], out[1]


def check_folder(data_dir: str) -> list[str]:
    """Class names of an image folder (sorted sub-folders); clear errors for a missing or empty folder."""
    if not data_dir:
        raise ValueError("dataset='folder' needs data_dir (a folder with one sub-folder per class)")
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"data_dir {data_dir!r} does not exist or is not a folder")
    classes = sorted(e.name for e in os.scandir(data_dir) if e.is_dir() and not e.name.startswith("."))
    if len(classes) < 2:
        raise ValueError(f"data_dir {data_dir!r} must hold one sub-folder per class (at least 2), "
                         f"found {classes}")
    return classes


def load_folder(config: Config) -> tuple[Dataset, Dataset]:
    from PIL import Image, UnidentifiedImageError

    classes = check_folder(config.data_dir)
    size = config.image_size or 64
    mode = "L" if config.in_chans == 1 else "RGB"
    images, labels, skipped = [], [], []
    for c, name in enumerate(classes):
        folder = os.path.join(config.data_dir, name)
        for fname in sorted(os.listdir(folder)):
            path = os.path.join(folder, fname)
            if not fname.lower().endswith(IMAGE_EXTENSIONS) or not os.path.isfile(path):
                continue
            try:
                with Image.open(path) as im:
                    arr = np.asarray(im.convert(mode).resize((size, size), Image.BILINEAR), np.float32) / 255.0
            except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
                skipped.append(f"{path}: {type(e).__name__}: {e}")
                continue
            images.append(arr if arr.ndim == 3 else arr[..., None])
            labels.append(c)
    if len(images) < 2:
        raise ValueError(f"data_dir {config.data_dir!r}: found {len(images)} readable images "
                         f"({len(skipped)} unreadable), need at least 2")
    ds = Dataset(np.stack(images), np.asarray(labels, np.int32), tuple(classes), skipped=tuple(skipped))
    tr, va = _split(len(ds), config.val_fraction, config.data_seed)
    return ds.take(tr), ds.take(va)


def load_dataset(config: Config) -> tuple[Dataset, Dataset]:
    """The fixed (train, validation) split of ``config.dataset``."""
    loaders = {"digits": load_digits, "cluttered_digits": load_cluttered_digits, "folder": load_folder}
    if config.dataset not in loaders:
        raise ValueError(f"unknown dataset {config.dataset!r}: expected one of {sorted(loaders)}")
    return loaders[config.dataset](config)


# --------------------------------------------------------------------------------------------------
# data order and device feeding
# --------------------------------------------------------------------------------------------------

def batch_indices(num_examples: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Indices of the global batch used at ``step``: a pure function, so resumption replays the order exactly.

    Epoch ``e = step // (num_examples // batch_size)`` shuffles with the permutation drawn from ``(seed, e)``;
    the last incomplete batch of each epoch is dropped.
    """
    steps_per_epoch = num_examples // batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"batch_size {batch_size} is larger than the training set ({num_examples} images)")
    epoch, j = divmod(step, steps_per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
    return perm[j * batch_size:(j + 1) * batch_size]


def device_batches(ds: Dataset, *, batch_size: int, seed: int, start_step: int, num_steps: int, sharding,
                   prefetch: int = 2) -> Iterator[tuple[int, object, object]]:
    """Yields ``(step, images, labels)`` as global ``jax.Array`` sharded over the batch axis.

    Each process assembles only its share of the global batch (rows ``[p * B / P, (p + 1) * B / P)``) and
    ``jax.make_array_from_process_local_data`` stitches the shares into one global array. ``prefetch``
    batches are in flight ahead of the consumer: the host-to-device copies are asynchronous, so the next batch
    is transferred while the current step runs.
    """
    import jax

    nproc, pid = jax.process_count(), jax.process_index()
    if batch_size % nproc:
        raise ValueError(f"batch_size {batch_size} is not divisible by the number of processes {nproc}")
    local = batch_size // nproc
    queue: collections.deque = collections.deque()
    for step in range(start_step, num_steps):
        idx = batch_indices(len(ds), batch_size, seed, step)[pid * local:(pid + 1) * local]
        x = jax.make_array_from_process_local_data(sharding, ds.images[idx])
        y = jax.make_array_from_process_local_data(sharding, ds.labels[idx])
        queue.append((step, x, y))
        if len(queue) > prefetch:
            yield queue.popleft()
    while queue:
        yield queue.popleft()
