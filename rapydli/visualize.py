"""``rapydli visualize``: what one unit of a trained network responds to.

Two pictures of unit ``U`` of layer ``L``: its *top-k stimuli*, the samples of a data set that
activate it most, and its *optimal stimulus*, the input of norm 1 that activates it most, found
by projected gradient ascent (a step along the gradient of the unit's activation with respect
to the input, then back onto the unit sphere). The gradient comes from the layers' own
``forward`` / ``backward``, run here in-process on whole batches: an input region that reaches
past the edges is zero-filled as the lowering does, so padded convolutions work too.

``rapydli visualize RUN_DIR --layer L --unit U [--data digits|patches|STORE_URL] [--top-k 16]
[-o FILE.png]``
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from rapydli.errors import ConfigError, ShapeError
from rapydli.graph.ops import assemble
from rapydli.graph.tiles import intersect, relative


def _layer_index(network, layer: str) -> int:
    names = [lyr.name for lyr in network.layers]
    if str(layer) not in names:
        raise ConfigError(f"--layer: no layer named {layer!r}; expected one of "
                          f"{', '.join(map(repr, names))} (layers are named by position "
                          "unless given a name)")
    return names.index(str(layer))


def _layer_params(layer, params: dict) -> dict:
    prefix = f"{layer.name}."
    return {k[len(prefix):]: np.asarray(v, np.float64) for k, v in params.items()
            if k.startswith(prefix)}


def forward_to(network, params, x, stop: int) -> list[tuple]:
    """``(layer input as read, its region, output)`` for layers ``0..stop`` on the batch ``x``."""
    trace, value = [], np.asarray(x, dtype=np.float64)
    for layer, (in_s, out_s) in zip(network.layers[:stop + 1], network.shapes):
        n = len(value)
        need = layer.input_region(((0, n), *((0, s) for s in out_s)), in_s)
        held = ((0, n), *((0, s) for s in in_s))
        piece = intersect(need, held)
        read = assemble(need, [(piece, value, held)] if piece else [], np.float64, like=value)
        out = layer.forward(read, _layer_params(layer, params))
        trace.append((read, need, out))
        value = out
    return trace


def unit_activation_and_grad(network, params, x, stop: int, unit: int):
    """Activations ``(N,)`` of flat unit ``unit`` of layer ``stop`` and their input gradients."""
    trace = forward_to(network, params, x, stop)
    out = trace[-1][2]
    dy = np.zeros_like(out).reshape(len(out), -1)
    dy[:, unit] = 1.0
    dy = dy.reshape(out.shape)
    for i in range(stop, -1, -1):
        layer, (in_s, _) = network.layers[i], network.shapes[i]
        read, need, out = trace[i]
        dread, _ = layer.backward(read, out, _layer_params(layer, params), dy, True)
        held = ((0, len(out)), *((0, s) for s in in_s))
        dy = np.zeros(tuple(b for _, b in held))  # only the cells inside the input count
        piece = intersect(need, held)
        if piece:
            dy[relative(piece, held)] = dread[relative(piece, need)]
    return trace[-1][2].reshape(len(x), -1)[:, unit], dy


def _unit_sphere(x):
    flat = x.reshape(len(x), -1)
    return (flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-300)).reshape(
        x.shape)


def optimal_stimulus(network, params, layer: str, unit: int, starts=None, *,
                     steps: int = 300, lr: float = 0.5, seed: int = 0):
    """The norm-1 input that activates ``unit`` of ``layer`` most, and that activation.

    Projected gradient ascent from every row of ``starts`` (scaled to norm 1) and one random
    start: a step along the gradient, then a projection back onto the unit sphere; a step is
    kept only if the activation grows (else the step size halves; it grows by 1.2 after a
    success), so the result activates the unit at least as much as every start.

    >>> from rapydli import Dense, Sequential
    >>> net = Sequential([Dense(1)], input_shape=(2,))
    >>> x, a = optimal_stimulus(net, {"0.weight": np.array([[3.0, 4.0]]),
    ...                               "0.bias": np.zeros(1)}, "0", 0)
    >>> np.round(x, 4).tolist(), round(a, 4)
    ([0.6, 0.8], 5.0)
    """
    stop = _layer_index(network, layer)
    rng = np.random.default_rng(seed)
    x0 = rng.standard_normal((1, *network.input_shape))
    if starts is not None and len(starts):
        x0 = np.concatenate([np.asarray(starts, np.float64).reshape(-1, *network.input_shape),
                             x0])
    x = _unit_sphere(x0)
    act, grad = unit_activation_and_grad(network, params, x, stop, unit)
    rate = np.full(len(x), float(lr))
    for _ in range(steps):
        step = (rate / np.maximum(np.linalg.norm(grad.reshape(len(x), -1), axis=1), 1e-300))
        trial = _unit_sphere(x + step.reshape(-1, *[1] * (x.ndim - 1)) * grad)
        trial_act, trial_grad = unit_activation_and_grad(network, params, trial, stop, unit)
        better = trial_act >= act
        x[better], act[better], grad[better] = trial[better], trial_act[better], trial_grad[better]
        rate = np.where(better, rate * 1.2, rate * 0.5)
        if rate.max() < 1e-9:
            break
    best = int(np.argmax(act))
    return x[best], float(act[best])


def load_stimuli(spec: str, input_shape) -> np.ndarray:
    """Samples of a data set name (``digits``, ``synthetic``, ``patches``) or a store URL,
    shaped as ``input_shape`` (their sizes must match)."""
    from rapydli.config import DATASETS, DataConfig

    size = math.prod(input_shape)
    if spec in DATASETS:
        from rapydli.storage.datasets import load_dataset

        side = math.isqrt(size) if math.isqrt(size) ** 2 == size else 8
        ds = load_dataset(DataConfig(spec, patch_size=max(side, 2)), "float64")
        x = np.concatenate([ds.x_train, ds.x_test])
    else:
        from rapydli.storage.records import open_store

        store = open_store(spec)
        x = np.concatenate([store.read_shard(name).x for name in store.shards])
    if math.prod(x.shape[1:]) != size:
        raise ShapeError(f"--data {spec}: samples have shape {tuple(x.shape[1:])}; the network "
                         f"takes {tuple(input_shape)}. Choose data of {size} values a sample")
    return x.reshape(len(x), *input_shape).astype(np.float64)


def visualize_unit(network, params, layer: str, unit: int, x, *, top_k: int = 16,
                   path=None, steps: int = 300) -> dict:
    """Top-``top_k`` stimuli of ``unit`` among ``x`` and its optimal norm-1 stimulus.

    Writes a PNG to ``path`` when given. Returns ``top`` (indices into ``x``, most active
    first), ``top_activations``, ``top_activations_norm1`` (the same samples scaled to norm
    1), ``stimulus`` and ``stimulus_activation``.
    """
    stop = _layer_index(network, layer)
    n_units = math.prod(network.shapes[stop][1])
    if not 0 <= unit < n_units:
        raise ConfigError(f"--unit: layer {layer!r} has {n_units} units (0..{n_units - 1}); "
                          f"received {unit}")
    acts = np.concatenate([forward_to(network, params, x[i:i + 1024], stop)[-1][2]
                           .reshape(len(x[i:i + 1024]), -1)[:, unit]
                           for i in range(0, len(x), 1024)])
    top = np.argsort(-acts, kind="stable")[:top_k]
    scaled, _ = unit_activation_and_grad(network, params, _unit_sphere(x[top]), stop, unit)
    stimulus, best = optimal_stimulus(network, params, layer, unit, x[top], steps=steps)
    result = {"top": top, "top_activations": acts[top], "top_activations_norm1": scaled,
              "stimulus": stimulus, "stimulus_activation": best}
    if path is not None:
        _draw(result, x, network.input_shape, f"layer {layer}, unit {unit}", path)
    return result


def _as_image(sample, input_shape) -> np.ndarray:
    from rapydli.unsupervised import filter_images

    return filter_images(np.asarray(sample).reshape(1, -1), input_shape)[0]


def _draw(result: dict, x, input_shape, title: str, path) -> None:
    from rapydli.unsupervised import pyplot

    plt = pyplot()
    k = len(result["top"])
    cols = max(1, math.ceil(math.sqrt(k)))
    rows = max(1, math.ceil(k / cols))
    fig = plt.figure(figsize=(cols * 0.9 + rows * 0.9 + 0.6, rows * 0.9 + 0.6))
    grid = fig.add_gridspec(rows, cols + rows)
    for i in range(rows * cols):
        ax = fig.add_subplot(grid[i // cols, i % cols])
        ax.axis("off")
        if i < k:
            ax.imshow(_as_image(x[result["top"][i]], input_shape), cmap="gray",
                      interpolation="nearest")
            ax.set_title(f"{result['top_activations'][i]:.3g}", fontsize=6)
    ax = fig.add_subplot(grid[:, cols:])
    ax.axis("off")
    image = _as_image(result["stimulus"], input_shape)
    peak = max(float(np.abs(image).max()), 1e-12)
    ax.imshow(image, cmap="gray", vmin=-peak, vmax=peak, interpolation="nearest")
    ax.set_title(f"optimal stimulus (norm 1): {result['stimulus_activation']:.4g}", fontsize=8)
    fig.suptitle(f"{title}: top {k} stimuli (activation) | optimal stimulus", fontsize=9)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def load_run(run_dir):
    """``(network, params)`` of the latest checkpoint in ``run_dir``."""
    import rapydli.unsupervised  # noqa: F401  registers SparsityPenalty for the config
    from rapydli.storage.checkpoint import load_checkpoint
    from rapydli.storage.export import network_from_config

    params, _, meta = load_checkpoint(run_dir)
    return network_from_config(meta["network"], source=f"{run_dir} (checkpoint)"), params


def add_visualize_parser(subparsers) -> None:
    """``rapydli visualize RUN_DIR --layer L --unit U ...`` on a ``rapydli`` parser."""
    p = subparsers.add_parser("visualize", help="a unit's top stimuli from a data set and its "
                              "optimal norm-1 stimulus, as a PNG")
    p.add_argument("run_dir", help="run directory holding checkpoints (rapydli train --out)")
    p.add_argument("--layer", required=True, help="layer name (layers are named by position)")
    p.add_argument("--unit", required=True, type=int, help="unit of that layer's output "
                   "(flat index per sample)")
    p.add_argument("--data", default="digits", help="digits, synthetic, patches, or a store "
                   "path or URL (default digits)")
    p.add_argument("--top-k", type=int, default=16, help="stimuli shown (default 16)")
    p.add_argument("--steps", type=int, default=300, help="gradient-ascent steps (default 300)")
    p.add_argument("-o", "--output", help="PNG file (default RUN_DIR/unit-LAYER-UNIT.png)")
    p.set_defaults(func=cmd_visualize)


def cmd_visualize(args) -> int:
    """``rapydli visualize``: write the PNG and print the activations it shows."""
    if args.top_k < 1:
        raise ConfigError(f"--top-k: expected a positive int; received {args.top_k}")
    network, params = load_run(args.run_dir)
    x = load_stimuli(args.data, network.input_shape)
    path = Path(args.output or Path(args.run_dir) / f"unit-{args.layer}-{args.unit}.png")
    result = visualize_unit(network, params, args.layer, args.unit, x, top_k=args.top_k,
                            path=path, steps=args.steps)
    print(f"layer {args.layer}, unit {args.unit} on {args.data} ({len(x)} samples): top "
          f"activation {result['top_activations'][0]:.4g}; best top-{args.top_k} sample scaled "
          f"to norm 1 {result['top_activations_norm1'].max():.4g}; optimal norm-1 stimulus "
          f"{result['stimulus_activation']:.4g}")
    print(f"wrote {path}")
    return 0
