"""In-memory data sets: scikit-learn's digits, a generated 10-class problem, image patches.

``digits`` and ``synthetic`` give images of shape ``(N, 1, 8, 8)`` in ``[0, 1]`` and ``int64``
labels in ``[0, 10)``; ``patches`` gives ZCA-whitened natural-image patches ``(N, p * p)``
whose targets are the patches themselves (for ``mse`` autoencoders with a linear decoder).
The split is a fixed function of :class:`~rapydli.config.DataConfig`, so a run is repeatable.

>>> from rapydli.config import DataConfig
>>> ds = load_dataset(DataConfig("synthetic", n_samples=100))
>>> ds.x_train.shape, ds.y_test.shape, ds.n_classes
((80, 1, 8, 8), (20,), 10)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rapydli.config import DTYPES, DataConfig
from rapydli.errors import DataError

N_CLASSES = 10
SYNTHETIC_SAMPLES = 600
PATCH_SAMPLES = 10000
#: scikit-image sample images the patches are cut from (colour ones turned grey); all ship
#: with scikit-image, so they load offline
PATCH_IMAGES = ("camera", "astronaut", "coins", "moon", "page", "text", "grass", "gravel",
                "brick", "rocket", "coffee", "chelsea", "clock")
#: ZCA regulariser added to every eigenvalue of the patch covariance (pixels in [0, 1]); it
#: whitens the frequencies with more variance than this and damps the weaker, noisier ones
#: (at 8x8 the strongest 10 or so of 63; 0.001-0.003 let amplified noise into the filters)
ZCA_EPSILON = 0.01
#: blob centres (row, col) of the synthetic classes 0..8; class 9 is one wide central blob
_CENTRES = [(r, c) for r in (1.5, 3.5, 5.5) for c in (1.5, 3.5, 5.5)]


@dataclass(frozen=True, eq=False)
class Dataset:
    """A train/test split; arrays are read-only. Images ``(N, C, H, W)``, labels ``(N,)``
    (or real-valued targets, one per sample, for ``mse``)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    name: str

    def __post_init__(self):
        for field in ("x_train", "y_train", "x_test", "y_test"):
            view = np.asarray(getattr(self, field)).view()  # read-only view; caller's array untouched
            view.setflags(write=False)
            object.__setattr__(self, field, view)
        check = validate_targets if self.targets else validate_arrays
        check(self.x_train, self.y_train, where=f"{self.name}.train")
        check(self.x_test, self.y_test, where=f"{self.name}.test")
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise DataError(f"{self.name}: train and test samples differ in shape; received "
                            f"{self.x_train.shape[1:]} and {self.x_test.shape[1:]}")

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample, e.g. ``(1, 8, 8)``."""
        return tuple(self.x_train.shape[1:])

    @property
    def targets(self) -> bool:
        """Are the labels real-valued targets (``mse``) rather than class numbers?"""
        return self.y_train.dtype.kind == "f"

    @property
    def n_classes(self) -> int:
        """Number of classes; 0 for real-valued targets."""
        if self.targets:
            return 0
        return int(max(self.y_train.max(initial=-1), self.y_test.max(initial=-1))) + 1


def load_dataset(cfg: DataConfig, dtype: str = "float32") -> Dataset:
    """Load the data set ``cfg`` names and split it into train and test.

    Parameters
    ----------
    cfg : DataConfig
        ``name`` ("digits", "synthetic" or "patches"), ``test_fraction``, ``seed``,
        ``n_samples`` (and ``patch_size`` for "patches").
    dtype : str
        ``"float32"`` or ``"float64"`` for the images.

    Returns
    -------
    Dataset
        Images ``(N, 1, 8, 8)`` in ``[0, 1]``, ``int64`` labels; the split is stratified by class
        and fixed by ``cfg.seed``. "patches": ``(N, patch_size**2)`` patches (see
        :func:`patches`) whose targets are the patches themselves, split at random.

    Examples
    --------
    >>> ds = load_dataset(DataConfig("digits"))
    >>> len(ds.x_train), len(ds.x_test), ds.x_train.dtype
    (1437, 360, dtype('float32'))
    """
    if dtype not in DTYPES:
        raise DataError(f"load_dataset: dtype must be one of {', '.join(DTYPES)}; "
                        f"received {dtype!r}")
    if cfg.name == "patches":
        x = patches(cfg.n_samples or PATCH_SAMPLES, cfg.patch_size, cfg.seed).astype(dtype)
        x_train, x_test = _split(x, None, cfg.test_fraction, cfg.seed, cfg.name)
        return Dataset(x_train, x_train, x_test, x_test, cfg.name)  # targets are the inputs
    if cfg.name == "digits":
        x, y = _digits(cfg)
    else:
        x, y = synthetic(cfg.n_samples or SYNTHETIC_SAMPLES, cfg.seed)
    x = x.astype(dtype)
    validate_arrays(x, y, N_CLASSES, where=f"data {cfg.name!r}")
    x_train, x_test, y_train, y_test = _split(x, y, cfg.test_fraction, cfg.seed, cfg.name)
    return Dataset(x_train, y_train, x_test, y_test, cfg.name)


def _split(x, y, test_fraction: float, seed: int, name: str):
    from sklearn.model_selection import train_test_split

    if y is None:  # no classes to stratify by
        return train_test_split(x, test_size=test_fraction, random_state=seed)
    try:
        return train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    except ValueError as exc:
        raise DataError(f"data {name!r}: cannot split {len(y)} samples with test_fraction="
                        f"{test_fraction} stratified over {N_CLASSES} classes ({exc}); use more "
                        "samples (data.n_samples) or a test_fraction nearer 0.5") from None


def _digits(cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0)[:, None, :, :]  # (N, 8, 8) in [0, 16] -> (N, 1, 8, 8) in [0, 1]
    y = digits.target.astype(np.int64)
    if cfg.n_samples is not None:
        if cfg.n_samples > len(y):
            raise DataError(f"data.n_samples: digits has {len(y)} samples; received "
                            f"{cfg.n_samples}. Use at most {len(y)} or leave it unset")
        if cfg.n_samples < len(y):  # a class-balanced subset, fixed by the seed
            x, _, y, _ = _split(x, y, len(y) - cfg.n_samples, cfg.seed, "digits")
    return x, y


def synthetic(n_samples: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A learnable 10-class image problem: one Gaussian blob per class, jittered, plus noise.

    Classes 0..8 put a blob (sigma 1 pixel) at one of 3 x 3 positions; class 9 is one wide blob
    (sigma 2.5) in the centre. Classes are balanced; the result depends only on the arguments.

    Returns
    -------
    x : ndarray, float64, shape (n_samples, 1, 8, 8), in [0, 1]
    y : ndarray, int64, shape (n_samples,)

    Examples
    --------
    >>> x, y = synthetic(20, seed=1)
    >>> x.shape, sorted(set(y.tolist())) == list(range(10))
    ((20, 1, 8, 8), True)
    """
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n_samples) % N_CLASSES).astype(np.int64)
    centres = np.array([*_CENTRES, (3.5, 3.5)])[y]  # (N, 2)
    sigma = np.where(y == 9, 2.5, 1.0)[:, None, None]  # (N, 1, 1)
    centres = centres + rng.uniform(-0.5, 0.5, size=centres.shape)
    amplitude = rng.uniform(0.7, 1.0, size=(n_samples, 1, 1))
    rows = np.arange(8)[None, :, None] - centres[:, 0, None, None]  # (N, 8, 1)
    cols = np.arange(8)[None, None, :] - centres[:, 1, None, None]  # (N, 1, 8)
    blob = amplitude * np.exp(-(rows**2 + cols**2) / (2 * sigma**2))  # (N, 8, 8)
    noisy = blob + rng.normal(0.0, 0.1, size=blob.shape)
    return np.clip(noisy, 0.0, 1.0)[:, None, :, :], y  # (N, 1, 8, 8)


def patches(n_samples: int, patch_size: int = 8, seed: int = 0,
            epsilon: float = ZCA_EPSILON, rescale: bool = False) -> np.ndarray:
    """ZCA-whitened ``patch_size`` x ``patch_size`` patches of natural images, as in UFLDL.

    Samples ``n_samples`` patches (uniformly over :data:`PATCH_IMAGES`, then position; fixed by
    ``seed``), removes each patch's mean and whitens with ZCA (``epsilon`` added to the
    covariance eigenvalues): a direction of variance ``v`` comes out with ``v / (v + epsilon)``,
    about 1 for the strongest, less for the weaker, noisier ones.
    This is the input of UFLDL's "linear decoders" exercise; a sparse autoencoder with a
    linear output layer learns localized, oriented edge filters from it.

    With ``rescale``, the patches are instead truncated to +-3 standard deviations and that
    range mapped to ``[0.1, 0.9]``, the range a sigmoid output can reconstruct (UFLDL's first
    sparse-autoencoder exercise). That shrinks them about 4-fold, and weight decay strong
    enough to clean the filters at the whitened scale then wipes them out.

    Returns
    -------
    ndarray, float64, shape (n_samples, patch_size ** 2): patches flattened row by row

    Examples
    --------
    >>> x = patches(500, seed=1)
    >>> x.shape, bool(abs(x.mean(axis=1)).max() < 1e-9), 0.3 < float(x.std()) < 0.7
    ((500, 64), True, True)
    >>> x = patches(500, seed=1, rescale=True)
    >>> float(x.min()) >= 0.1, float(x.max()) <= 0.9
    (True, True)
    """
    images = _grey_images(patch_size)
    rng = np.random.default_rng(seed)
    which = rng.integers(0, len(images), n_samples)
    out = np.empty((n_samples, patch_size * patch_size))
    for i, k in enumerate(which):
        image = images[k]
        r, c = (int(rng.integers(0, n - patch_size + 1)) for n in image.shape)
        out[i] = image[r:r + patch_size, c:c + patch_size].ravel()
    x = out - out.mean(axis=1, keepdims=True)  # (N, p*p), each patch's mean removed
    eigenvalues, u = np.linalg.eigh(x.T @ x / n_samples)
    zca = (u / np.sqrt(eigenvalues + epsilon)) @ u.T  # (p*p, p*p), symmetric
    z = x @ zca
    if not rescale:
        return z
    bound = 3 * z.std()
    return (np.clip(z, -bound, bound) / bound + 1) * 0.4 + 0.1


def _grey_images(patch_size: int) -> list[np.ndarray]:
    try:
        import skimage.data
        from skimage.color import rgb2gray
    except ImportError:
        raise DataError("data 'patches' needs scikit-image; pip install scikit-image") from None
    images = []
    for name in PATCH_IMAGES:
        image = getattr(skimage.data, name)()
        grey = rgb2gray(image[..., :3]) if image.ndim == 3 else image / 255.0  # [0, 1]
        if min(grey.shape) >= patch_size:
            images.append(np.asarray(grey, dtype=np.float64))
    if not images:
        raise DataError(f"data.patch_size: no sample image is {patch_size} pixels wide; "
                        "use a smaller patch_size")
    return images


def validate_targets(x, y, where: str = "data") -> None:
    """Raise :class:`DataError` unless ``x`` and the real-valued targets ``y`` are finite and
    ``y`` holds one target per sample."""
    validate_arrays(x, np.zeros(len(x), np.int64), where=where)
    y = np.asarray(y)
    if len(y) != len(x) or not np.isfinite(y).all():
        raise DataError(f"{where}.y: expected {len(x)} finite targets, one per sample of x; "
                        f"received shape {y.shape}")


def validate_arrays(x, y, n_classes: int | None = None, where: str = "data") -> None:
    """Raise :class:`DataError` unless ``x`` is finite and ``y`` holds one integer label per
    sample in ``[0, n_classes)``.

    Examples
    --------
    >>> validate_arrays(np.array([[0.0], [np.nan]]), np.array([0, 1]))
    Traceback (most recent call last):
    ...
    rapydli.errors.DataError: data.x: found 1 NaN or infinite value(s) in 2 elements ...
    """
    x, y = np.asarray(x), np.asarray(y)
    if not np.issubdtype(x.dtype, np.number):
        raise DataError(f"{where}.x: expected a numeric array; received dtype {x.dtype}")
    n_bad = int(np.count_nonzero(~np.isfinite(x)))
    if n_bad:
        raise DataError(f"{where}.x: found {n_bad} NaN or infinite value(s) in {x.size} elements "
                        "(first at index "
                        f"{tuple(int(i) for i in np.argwhere(~np.isfinite(x))[0])}); expected "
                        "finite values. Drop or impute those samples")
    if y.ndim != 1 or len(y) != len(x):
        raise DataError(f"{where}.y: expected {len(x)} labels, one per sample of x, shape "
                        f"({len(x)},); received shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{where}.y: expected integer class labels; received dtype {y.dtype}. "
                        "Cast with y.astype(np.int64) if the values are whole numbers")
    if len(y) and (y.min() < 0 or (n_classes is not None and y.max() >= n_classes)):
        bound = ">= 0" if n_classes is None else f"[0, {n_classes})"
        raise DataError(f"{where}.y: expected labels in {bound}; received range "
                        f"[{y.min()}, {y.max()}]")


def batches(n: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffled index batches covering ``range(n)`` once; the last batch may be smaller.

    Examples
    --------
    >>> [len(b) for b in batches(10, 4, np.random.default_rng(0))]
    [4, 4, 2]
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise DataError(f"batches: n must be an int >= 0; received {n!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
            or batch_size < 1:
        raise DataError(f"batches: batch_size must be a positive int; received {batch_size!r}")
    order = rng.permutation(n)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]
