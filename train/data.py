"""Datasets (all in memory, deterministic given the seeds) and the device-feeding batch pipeline.

* ``digits``: scikit-learn's bundled handwritten digits (1,797 real 8x8 images, no download).
* ``cluttered_digits``: each image is one digit (scaled up) placed at a random position on a larger canvas
  (64x64 by default) among fragments cut from other digits, after "cluttered MNIST" (Mnih et al., 2014).
  The ground-truth box of the target digit is kept for every image (for the CAM localisation score).
  Train and validation images are built from disjoint sets of source digits.
* ``folder``: ``data_dir/<class>/<image>``; decoded with PIL and scaled to [0, 1] by the image's bit depth
  (8 or 16 bits); unreadable files are reported and skipped. A class folder without a readable image is an
  error (it would add a class no example can teach), or is dropped with ``drop_empty_classes``.

The train/validation split is fixed by ``data_seed`` (independent of the training ``seed``). The data order
is a pure function of ``(seed, step)``: epoch ``e`` uses the permutation drawn from ``(seed, e)``, so a run
resumed at step ``s`` sees exactly the batches an uninterrupted run sees.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from train.config import Config

log = logging.getLogger("train")

class DataError(ValueError):
    """The data of a run cannot be used as given (found before anything is written); the message says why."""


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
    out = np.asarray(Image.fromarray(img.astype(np.float32), mode="F").resize((size, size), Image.Resampling.BILINEAR))
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


def _class_folders(data_dir: str) -> list[str]:
    """Every class sub-folder of ``data_dir`` (sorted, hidden ones excluded), empty or not."""
    return sorted(e.name for e in os.scandir(data_dir) if e.is_dir() and not e.name.startswith("."))


def _image_files(folder: str) -> list[str]:
    return [os.path.join(folder, n) for n in sorted(os.listdir(folder))
            if n.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(folder, n))]


def _keep_classes(data_dir: str, classes: list[str], empty: list[str], drop_empty: bool, what: str) -> list[str]:
    """The classes left after the empty ones are refused or dropped; at least 2 must remain."""
    if empty and not drop_empty:
        raise DataError(f"data_dir {data_dir!r}: class folder(s) {empty} hold no {what}; each would be a class "
                        f"no example teaches: add images, remove the folder(s), or pass --drop_empty_classes")
    kept = [c for c in classes if c not in empty]
    if len(kept) < 2:
        raise DataError(f"data_dir {data_dir!r}: {len(kept)} class folder(s) with {what} ({kept}), need at "
                        f"least 2 to train a classifier (empty: {empty})")
    return kept


def check_folder(data_dir: str, *, drop_empty: bool = False) -> list[str]:
    """Class names of an image folder (sorted sub-folders that hold image files).

    Raises:
        FileNotFoundError: ``data_dir`` is missing.
        DataError: fewer than 2 class folders, or a class folder without image files (unless ``drop_empty``,
            which leaves it out with a warning).
    """
    if not data_dir:
        raise DataError("dataset='folder' needs data_dir (a folder with one sub-folder per class)")
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"data_dir {data_dir!r} does not exist or is not a folder")
    classes = _class_folders(data_dir)
    if len(classes) < 2:
        raise DataError(f"data_dir {data_dir!r} must hold one sub-folder per class (at least 2), "
                        f"found {classes}")
    empty = [c for c in classes if not _image_files(os.path.join(data_dir, c))]
    return _keep_classes(data_dir, classes, empty, drop_empty, f"image files ({', '.join(IMAGE_EXTENSIONS)})")


def _decode(im, mode: str, size: int) -> np.ndarray:
    """One PIL image as float32 ``(size, size, C)`` in [0, 1], scaled by its bit depth (8 or 16 bits)."""
    from PIL import Image

    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):  # 16-bit greyscale (PNG, TIFF, PGM)
        arr = np.asarray(im, dtype=np.float32)
        if arr.min() < 0 or arr.max() > 65535:
            raise ValueError(f"{im.mode} image with values outside the 16-bit range [0, 65535]")
        grey = np.asarray(Image.fromarray(arr / 65535.0, mode="F").resize((size, size), Image.Resampling.BILINEAR))
        grey = np.clip(grey, 0.0, 1.0)[..., None]
        return grey if mode == "L" else np.repeat(grey, 3, axis=-1)
    if im.mode == "F":
        raise ValueError("floating-point images are not supported (no known bit depth): save them as 8 or 16 bit")
    arr = np.asarray(im.convert(mode).resize((size, size), Image.Resampling.BILINEAR), np.float32) / 255.0
    return arr if arr.ndim == 3 else arr[..., None]


def load_folder(config: Config) -> tuple[Dataset, Dataset]:
    from PIL import Image, UnidentifiedImageError

    classes = check_folder(config.data_dir, drop_empty=config.drop_empty_classes)
    size = config.image_size or 64
    mode = "L" if config.in_chans == 1 else "RGB"
    per_class: dict[str, list[np.ndarray]] = {}
    skipped = []
    for name in classes:
        per_class[name] = []
        for path in _image_files(os.path.join(config.data_dir, name)):
            try:
                with Image.open(path) as im:
                    per_class[name].append(_decode(im, mode, size))
            except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
                skipped.append(f"{path}: {type(e).__name__}: {e}")
    empty = [c for c in classes if not per_class[c]]
    kept = _keep_classes(config.data_dir, classes, empty, config.drop_empty_classes, "readable image")
    dropped = sorted(set(_class_folders(config.data_dir)) - set(kept))
    if dropped:
        log.warning("data_dir %r: dropped class folder(s) without a readable image: %s (training %d classes: %s)",
                    config.data_dir, dropped, len(kept), kept)
    images = [im for c in kept for im in per_class[c]]
    labels = [k for k, c in enumerate(kept) for _ in per_class[c]]
    if len(images) < 2:
        raise DataError(f"data_dir {config.data_dir!r}: found {len(images)} readable images "
                        f"({len(skipped)} unreadable), need at least 2")
    ds = Dataset(np.stack(images), np.asarray(labels, np.int32), tuple(kept), skipped=tuple(skipped))
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
