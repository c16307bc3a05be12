"""Unsupervised feature learning: sparse autoencoders, greedy layer-wise pretraining, reports.

The sparse-autoencoder objective of the UFLDL tutorial and the "face neuron" work is

    J(W, b) = reconstruction + beta * sum_j KL(rho || rho_hat_j) + weight_decay / 2 * ||params||^2

- *reconstruction* is the network's ``mse`` loss of its output against its input (the mean over
  samples **and** features of the squared error; UFLDL's ``1/m sum 1/2 ||h - x||^2`` is
  ``features / 2`` times it, so a UFLDL ``beta`` corresponds to ``beta * 2 / features`` here);
- the *sparsity* term is a :class:`SparsityPenalty` layer placed after the hidden sigmoid layer:
  ``rho_hat_j`` is the mean activation of hidden unit ``j`` over the **whole** batch. The
  lowering (:meth:`rapydli.graph.lower._Lowering.penalty`) has every batch tile sum its rows and
  all-reduces those sums across batch tiles, so data parallelism moves ``units`` numbers, not
  activations; the penalty's value joins the step's loss metric, so
  :func:`~rapydli.training.value_and_grad`, :func:`~rapydli.training.fit` and
  :func:`~rapydli.training.evaluate` report reconstruction + sparsity;
- *weight decay* stays with the optimizer (``SGD(weight_decay=lam)`` adds ``lam * p`` to the
  gradient of **every** parameter, biases included, which is the gradient of
  ``lam / 2 * sum ||p||^2``). The network's loss does not include it (a network has no
  optimizer); :func:`sparse_autoencoder_objective` adds it, giving the total objective whose
  gradient SGD follows, and that is what the finite-difference checks check.

>>> ae = sparse_autoencoder(64, 25)
>>> [type(layer).__name__ for layer in ae.layers], ae.loss.name
(['Dense', 'SparsityPenalty', 'Dense'], 'mse')
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

from rapydli.errors import ConfigError
from rapydli.kernels.backend import get_array_module
from rapydli.layers import LAYER_TYPES, Dense, Layer
from rapydli.network import Sequential

#: guards ``log`` and the division by ``rho_hat`` where a unit is exactly 0 or 1 on the batch
_TINY = 1e-12


@dataclass(frozen=True)
class SparsityPenalty(Layer):
    """Identity layer adding ``beta * sum_j KL(target || rho_hat_j)`` to the objective.

    ``rho_hat_j`` is the mean over the whole batch of unit ``j`` of this layer's input, which
    must lie in (0, 1) (put it after a sigmoid layer). Forward is the identity; backward adds
    ``beta * (-target / rho_hat + (1 - target) / (1 - rho_hat)) / batch`` to every row's ``dy``.

    Examples
    --------
    >>> import numpy as np
    >>> layer = SparsityPenalty(target=0.5, beta=1.0)
    >>> y = np.full((4, 2), 0.5)
    >>> value, dy = layer.penalty(y, layer.penalty_stats(y), 4)
    >>> value, dy.tolist()
    (0.0, [0.0, 0.0])
    """

    target: float = 0.05
    beta: float = 3.0
    splittable: ClassVar[tuple[str, ...]] = ("batch", "features", "channels", "rows")

    def __post_init__(self):
        t, b = self.target, self.beta
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < 1:
            raise ConfigError(f"SparsityPenalty: target must be a number in (0, 1), e.g. 0.05; "
                              f"received {t!r}")
        if isinstance(b, bool) or not isinstance(b, (int, float)) or b < 0:
            raise ConfigError(f"SparsityPenalty: beta must be a number >= 0, e.g. 3.0; "
                              f"received {b!r}")

    def output_shape(self, input_shape):
        return tuple(input_shape)

    def input_region(self, out, input_shape):
        return out

    def forward(self, x, params):
        return x

    def backward(self, x, y, params, dy, need_dx):
        return dy, {}

    # --- the penalty hooks the lowering calls (see rapydli.graph.lower) ------------------------

    def penalty_stats(self, y):
        """Per-unit sums over this tile's batch rows; the tiles' sums add to the batch's."""
        return y.sum(axis=0)  # (units...)

    def penalty(self, y, stats, batch: int):
        """``(value, dy_extra)`` from the whole batch's per-unit sums ``stats``.

        ``dy_extra`` has one sample's unit shape and broadcasts over the tile's rows.
        """
        xp = get_array_module(stats)
        rho = float(self.target)
        rho_hat = xp.clip(stats / batch, _TINY, 1 - _TINY)  # (units...)
        kl = rho * xp.log(rho / rho_hat) + (1 - rho) * xp.log((1 - rho) / (1 - rho_hat))
        value = self.beta * float(kl.sum(dtype=xp.float64))
        dy_extra = self.beta * (-(rho / rho_hat) + (1 - rho) / (1 - rho_hat)) / batch
        return value, dy_extra.astype(y.dtype, copy=False)


# registered for configs (``{type: SparsityPenalty, target: 0.05, beta: 3}``) once imported
LAYER_TYPES.setdefault("SparsityPenalty", SparsityPenalty)


def has_penalty(network) -> bool:
    """Does ``network`` hold a :class:`SparsityPenalty` layer?"""
    return any(isinstance(layer, SparsityPenalty) for layer in network.layers)


def sparse_autoencoder(n_in: int, n_hidden: int, target: float = 0.05, beta: float = 3.0,
                       output_activation: str | None = "sigmoid") -> Sequential:
    """``n_in -> n_hidden`` sigmoid units, their :class:`SparsityPenalty`, ``-> n_in``, mse.

    Layers are named ``"0"`` (encoder), ``"1"`` (penalty), ``"2"`` (decoder). A sigmoid output
    needs targets in (0, 1), e.g. ``patches(..., rescale=True)``; the whitened ``patches`` data
    set needs a linear one (``output_activation=None``).
    """
    return Sequential([Dense(n_hidden, activation="sigmoid"), SparsityPenalty(target, beta),
                       Dense(n_in, activation=output_activation)],
                      input_shape=(n_in,), loss="mse")


def sparse_autoencoder_objective(network, params, x, *, weight_decay: float = 0.0,
                                 placement=None, client=None, dtype=None):
    """Total objective (reconstruction + sparsity + weight decay) and its gradients.

    The first two come from the lowered graph (:func:`~rapydli.training.value_and_grad`, the
    targets being ``x`` itself); ``weight_decay / 2 * sum ||p||^2`` over every parameter is
    added here, as ``SGD(weight_decay=...)`` decays every parameter.

    Returns
    -------
    value : float
    grads : dict of str to ndarray, shaped like ``params``
    """
    from rapydli.training import value_and_grad

    target = np.reshape(x, (len(x), -1))  # (N, features): mse targets are the inputs
    value, grads = value_and_grad(network, params, x, target, placement=placement,
                                  client=client, dtype=dtype)
    if weight_decay:
        value += 0.5 * weight_decay * sum(float(np.sum(np.square(p, dtype=np.float64)))
                                          for p in params.values())
        grads = {k: g + weight_decay * np.asarray(params[k], g.dtype) for k, g in grads.items()}
    return value, grads


# --- greedy layer-wise pretraining ----------------------------------------------------------


@dataclass
class Pretrained:
    """The result of :func:`pretrain_stack`: one sigmoid encoder per stage, and how it went."""

    #: size of one input sample (features)
    n_in: int
    #: per stage, ``{"weight": (units, inputs), "bias": (units,)}`` of its encoder
    encoders: list[dict[str, np.ndarray]] = field(default_factory=list)
    #: per stage, reconstruction error (mse on its own input) before and after training
    errors: list[tuple[float, float]] = field(default_factory=list)
    #: per stage, the :class:`~rapydli.training.History` of its training
    histories: list = field(default_factory=list)

    def network(self, head=()) -> Sequential:
        """``Dense(units, sigmoid)`` per stage, then the layers ``head`` (e.g. a classifier)."""
        layers = [Dense(int(e["weight"].shape[0]), activation="sigmoid")
                  for e in self.encoders]
        return Sequential([*layers, *head], input_shape=(self.n_in,),
                          loss="softmax_cross_entropy" if head else "mse")

    def params(self, network: Sequential | None = None, seed: int = 0) -> dict:
        """Parameters of :meth:`network` (or of ``network``): the stages' encoders first, the
        layers after them initialised from ``seed``."""
        network = network or self.network()
        dtype = self.encoders[0]["weight"].dtype if self.encoders else np.float32
        params = network.init(seed, dtype)
        for layer, encoder in zip(network.layers, self.encoders):
            for pname, value in encoder.items():
                params[f"{layer.name}.{pname}"] = value.copy()
        network.check_params(params)
        return params


def encode(encoder: dict[str, np.ndarray], x, **kw) -> np.ndarray:
    """``sigmoid(x @ weight.T + bias)`` through the engine (``kw``: placement, client)."""
    from rapydli.training import predict

    units, n_in = encoder["weight"].shape
    net = Sequential([Dense(int(units), activation="sigmoid")], input_shape=(int(n_in),))
    return predict(net, {"0.weight": encoder["weight"], "0.bias": encoder["bias"]}, x, **kw)


def reconstruction_error(network, params, x, **kw) -> float:
    """Mean squared error of ``network``'s output against its (flattened) input ``x``."""
    from rapydli.training import predict

    out = predict(network, params, x, **kw)  # (N, features)
    return float(np.mean((out.reshape(len(x), -1) - np.reshape(x, (len(x), -1))) ** 2))


def pretrain_stack(sizes, x, *, target: float = 0.05, beta: float = 3.0, optimizer=None,
                   epochs: int = 10, batch_size: int = 64, seed: int = 0, placement=None,
                   client=None, dtype: str = "float32") -> Pretrained:
    """Greedy layer-wise pretraining: a sparse autoencoder per entry of ``sizes``.

    Stage ``k`` trains :func:`sparse_autoencoder` ``(inputs, sizes[k])`` to reconstruct its
    input (``x`` for the first, the previous stage's codes after that) with :func:`fit`, then
    encodes its input for the next stage. Inputs must lie in [0, 1] (sigmoid outputs
    reconstruct them); codes do. Each stage's hidden biases start at ``logit(target)``, where
    the sparsity penalty is already satisfied, so its gradient starts small.

    Returns
    -------
    Pretrained
        ``encoders`` (initialise ``Pretrained.network()`` with ``Pretrained.params()``), the
        reconstruction errors before and after each stage, and each stage's history.
    """
    from rapydli.optim import SGD
    from rapydli.training import fit

    x = np.asarray(x, dtype=dtype).reshape(len(x), -1)  # (N, features)
    kw = dict(placement=placement, client=client)
    result = Pretrained(int(x.shape[1]))
    for k, units in enumerate(sizes):
        ae = sparse_autoencoder(int(x.shape[1]), int(units), target, beta)
        params = ae.init(seed + k, dtype)
        params["0.bias"][:] = math.log(target / (1 - target))
        before = reconstruction_error(ae, params, x, **kw)
        history = fit(ae, x, x, optimizer=optimizer or SGD(lr=0.5, momentum=0.9),
                      epochs=epochs, batch_size=batch_size, seed=seed + k, params=params,
                      dtype=dtype, **kw)
        encoder = {"weight": history.params["0.weight"], "bias": history.params["0.bias"]}
        result.errors.append((before, reconstruction_error(ae, history.params, x, **kw)))
        result.encoders.append(encoder)
        result.histories.append(history)
        x = encode(encoder, x, **kw)  # (N, units): the next stage's input
    return result


# --- what a trained sparse autoencoder learned ---------------------------------------------

#: share of a filter's pixels whose energy the localization figure sums
TOP_FRACTION = 0.2


def localization(weights, top: float = TOP_FRACTION) -> float:
    """Mean over filters (rows) of the share of energy in their strongest ``top`` of pixels.

    A filter's energy is its sum of squared weights. Each row's mean is removed first: the
    patches have zero mean, so a filter's mean weight acts only as a bias and says nothing of
    where it looks. 1.0: all energy in ``top`` of the pixels; ``top``: spread evenly.

    >>> round(localization(np.eye(10)), 3), localization(np.ones((2, 10)) + np.arange(10) % 2)
    (0.911, 0.2)
    """
    w = np.asarray(weights, dtype=np.float64).reshape(len(weights), -1)  # (filters, pixels)
    w = w - w.mean(axis=1, keepdims=True)
    energy = np.sort(w ** 2, axis=1)[:, ::-1]  # strongest pixel first
    k = max(1, math.ceil(top * energy.shape[1]))
    return float(np.mean(energy[:, :k].sum(axis=1) / np.maximum(energy.sum(axis=1), _TINY)))


def filter_images(weights, input_shape) -> np.ndarray:
    """First-layer weight rows as images ``(filters, rows, cols)`` (first channel of images;
    square flat inputs become squares; others one row)."""
    w = np.asarray(weights).reshape(len(weights), -1)  # (filters, inputs)
    if len(input_shape) == 3:
        c, h, wd = input_shape
        return w.reshape(len(w), c, h, wd)[:, 0]
    side = math.isqrt(w.shape[1])
    shape = (side, side) if side * side == w.shape[1] else (1, w.shape[1])
    return w.reshape(len(w), *shape)


def pyplot():
    """``matplotlib.pyplot`` on the Agg back end, or a ConfigError saying how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("drawing PNGs needs matplotlib; pip install matplotlib "
                          "(or rapydli[plot])") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_grid(images, path, titles=None, scale: float = 0.7) -> None:
    """A grid of images, each scaled to its largest magnitude (grey 0, white +, black -)."""
    plt = pyplot()
    n = len(images)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * scale + 0.2, rows * scale + 0.2),
                             squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            image = np.asarray(images[i], dtype=np.float64)
            peak = max(float(np.abs(image).max()), _TINY)
            ax.imshow(image / peak, cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
            if titles is not None:
                ax.set_title(titles[i], fontsize=6)
    fig.tight_layout(pad=0.2)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _first_weight(network, params) -> np.ndarray:
    for layer in network.layers:
        if f"{layer.name}.weight" in params:
            return np.asarray(params[f"{layer.name}.weight"])
    raise ConfigError("report_unsupervised: the network has no layer with weights")


def report_unsupervised(run_dir, network, params, x, *, seed: int = 0,
                        echo: bool = True) -> dict | None:
    """Figures of a trained network holding a :class:`SparsityPenalty`; ``None`` without one.

    Writes ``run_dir/filters.png`` (the first layer's weight rows as images, each less its mean
    and scaled to its largest magnitude) and ``run_dir/unsupervised.json``: the mean hidden
    activation (the penalty layer's input over ``x``) next to the target, the reconstruction
    error (when the output has the input's size) and the :func:`localization` of the first
    layer's filters next to that of Gaussian random filters of the same shape (drawn from
    ``seed``). Prints them with ``echo``. ``x`` that is not an array (e.g. a store source)
    gives ``None`` too.
    """
    index = next((i for i, layer in enumerate(network.layers)
                  if isinstance(layer, SparsityPenalty)), None)
    if index is None or not isinstance(x, np.ndarray):
        return None
    report = _figures(network, params, np.asarray(x), index, seed)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = _first_weight(network, params).reshape(report["n_filters"], -1)  # (filters, inputs)
    try:
        save_grid(filter_images(rows - rows.mean(axis=1, keepdims=True), network.input_shape),
                  run_dir / "filters.png")
        written = [run_dir / "filters.png"]
    except ConfigError as exc:  # no matplotlib: the figures still count
        print(f"note: no filters.png: {exc}")
        written = []
    (run_dir / "unsupervised.json").write_text(json.dumps(report, indent=1))
    if echo:
        print(format_report(report))
        print(f"wrote {' and '.join(str(p) for p in [*written, run_dir / 'unsupervised.json'])}")
    return report


def _figures(network, params, x, index: int, seed: int) -> dict:
    from rapydli.training import predict

    x = x.reshape(len(x), *network.input_shape)
    encoder = Sequential(list(network.layers[:index + 1]), network.input_shape)
    hidden = predict(encoder, {k: params[k] for k in encoder.param_shapes()}, x)
    rho_hat = hidden.reshape(len(x), -1).mean(axis=0)  # (units,)
    out = predict(network, params, x).reshape(len(x), -1)  # (N, outputs)
    flat = x.reshape(len(x), -1)  # (N, inputs)
    weights = _first_weight(network, params)
    rng = np.random.default_rng(seed)
    return {
        "target": float(network.layers[index].target),
        "mean_activation": float(rho_hat.mean()),
        "unit_activation_range": [float(rho_hat.min()), float(rho_hat.max())],
        "reconstruction_error": (float(np.mean((out - flat) ** 2))
                                 if out.shape == flat.shape else None),
        "localization": {"learned": localization(weights),
                         "random": localization(rng.standard_normal(weights.shape)),
                         "top_fraction": TOP_FRACTION},
        "n_filters": len(weights), "n_samples": len(x),
    }


def format_report(report: dict) -> str:
    """The figures of :func:`report_unsupervised` in three lines."""
    loc = report["localization"]
    recon = report["reconstruction_error"]
    return "\n".join([
        f"hidden activation: mean {report['mean_activation']:.4f} (target "
        f"{report['target']:g}); per unit {report['unit_activation_range'][0]:.4f}.."
        f"{report['unit_activation_range'][1]:.4f}",
        f"reconstruction error (mse): {'n/a' if recon is None else f'{recon:.5f}'}",
        f"localization (energy share in the strongest {loc['top_fraction']:.0%} of pixels): "
        f"learned {loc['learned']:.3f}, random {loc['random']:.3f}"])
