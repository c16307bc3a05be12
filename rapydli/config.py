"""Run configuration: a YAML file becomes frozen, validated dataclasses (no training here).

A config has five sections; only ``network`` is required::

    data:      {name: digits, test_fraction: 0.2, seed: 0}
    network:   {input_shape: [1, 8, 8], layers: [...], loss: softmax_cross_entropy}
    optimizer: {name: sgd, lr: 0.05, momentum: 0.9}
    train:     {epochs: 10, batch_size: 64, seed: 0, dtype: float32, eval_every: 1}
    placement: {preset: hybrid, mesh: {data: 1, model: 2}, layers: {"3": {batch: data}}}

Every mistake is caught here, on the client, with the dotted path of the field at fault, the
value expected and the value received. Unknown keys are errors, because a typo (``optimiser``)
would otherwise silently fall back to a default.

Examples
--------
>>> cfg = parse_config({"network": {"input_shape": [4],
...                                 "layers": [{"type": "Dense", "units": 3}]}})
>>> cfg.network.build().output_shape, cfg.placement.preset, cfg.train.batch_size
((3,), 'single', 64)
"""
from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rapydli import layers as layers_mod
from rapydli import optim
from rapydli.errors import ConfigError, RapydliError
from rapydli.layers import Layer
from rapydli.network import Sequential
from rapydli.placement import Mesh, Placement, Tiling

#: top-level sections of a config file; only ``network`` has no default
SECTIONS = ("data", "network", "optimizer", "train", "placement")
#: data set names understood by :func:`rapydli.storage.datasets.load_dataset`
DATASETS = ("digits", "synthetic", "patches")
DTYPES = ("float32", "float64")
#: placement preset -> rule name in :data:`rapydli.placement.RULES`
PRESET_RULES = {"single": "single", "data_parallel": "data", "model_parallel": "model",
                "spatial_parallel": "spatial", "hybrid": "hybrid"}
#: mesh axes each preset's rule cuts along
PRESET_AXES = {"single": (), "data_parallel": ("data",), "model_parallel": ("model",),
               "spatial_parallel": ("model",), "hybrid": ("data", "model")}
#: the mesh a preset gets when the config gives none
DEFAULT_MESH = {"single": (), "data_parallel": (("data", 2),), "model_parallel": (("model", 2),),
                "spatial_parallel": (("model", 2),), "hybrid": (("data", 1), ("model", 2))}
MESH_AXES = ("data", "model")


# ----------------------------------------------------------------------------- value checks
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(value: Any, where: str, minimum: int = 1) -> None:
    if not _is_int(value) or value < minimum:
        what = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ConfigError(f"{where}: expected {what}; received {value!r}")


def _check_choice(value: Any, legal: tuple[str, ...], where: str, what: str = "value") -> None:
    if value not in legal:
        raise ConfigError(f"{where}: unknown {what} {value!r}; expected one of "
                          f"{', '.join(map(repr, legal))}")


def check_keys(raw: Any, legal: tuple[str, ...], where: str) -> dict:
    """``raw`` as a dict, or a ConfigError if it is not a mapping or has an unknown key."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a mapping with keys {', '.join(legal)}; "
                          f"received {type(raw).__name__} {raw!r}")
    for key in raw:
        if key not in legal:
            close = difflib.get_close_matches(str(key), legal, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}: unknown key {key!r}{hint}; expected keys "
                              f"{', '.join(legal)}")
    return dict(raw)


def _require(raw: dict, key: str, where: str, legal: tuple[str, ...], hint: str = "") -> Any:
    if key not in raw:
        raise ConfigError(f"{where}: missing key {key!r}; expected keys {', '.join(legal)}{hint}")
    return raw[key]


def _tupled(value: Any) -> Any:
    """YAML lists -> tuples, so specs built from them stay hashable."""
    return tuple(_tupled(v) for v in value) if isinstance(value, list) else value


# ----------------------------------------------------------------------------- sections
@dataclass(frozen=True)
class DataConfig:
    """Which data set to load and how to split it; see :mod:`rapydli.storage.datasets`.

    >>> DataConfig(name="synthetic", n_samples=200).test_fraction
    0.2
    """

    #: ``"digits"`` (scikit-learn), ``"synthetic"`` (generated) or ``"patches"`` (whitened
    #: natural-image patches, targets = inputs, for autoencoders; needs scikit-image)
    name: str = "digits"
    test_fraction: float = 0.2  #: share of samples held out for evaluation, in (0, 1)
    seed: int = 0  #: seeds the split (and the generator of ``synthetic``)
    n_samples: int | None = None  #: ``None``: all of digits, 600 synthetic, 10000 patches
    patch_size: int = 8  #: ``patches``: side of the square patches (``patch_size**2`` features)
    #: a sharded store (path or fsspec URL, see :mod:`rapydli.storage.records`) to train from
    #: instead of ``name``; its shards are read by the workers, split by hash of record key
    store: str | None = None
    #: fsspec options for ``store`` (endpoint, credentials), e.g. ``{anon: true}``
    storage_options: Mapping | None = field(default=None, compare=False, hash=False)
    distribution: str = "round_robin"  #: shards -> data groups (``storage.policies``)
    labels: tuple[int, ...] | None = None  #: use only records with these labels
    ranges: tuple[tuple[int, int], ...] | None = None  #: use only these record positions
    max_skipped: float = 0.01  #: largest share of unusable records before the run stops

    def __post_init__(self):
        _check_choice(self.name, DATASETS, "data.name", "data set")
        if self.store is not None and (not isinstance(self.store, str) or not self.store):
            raise ConfigError(f"data.store: expected a path or URL string such as "
                              f"runs/digits-store or s3://bucket/prefix; received {self.store!r}")
        if self.storage_options is not None and not isinstance(self.storage_options, Mapping):
            raise ConfigError(f"data.storage_options: expected a mapping of fsspec options; "
                              f"received {self.storage_options!r}")
        from rapydli.storage.policies import DISTRIBUTIONS

        _check_choice(self.distribution, DISTRIBUTIONS, "data.distribution", "distribution")
        skipped = self.max_skipped
        if isinstance(skipped, bool) or not isinstance(skipped, (int, float)) \
                or not 0 <= skipped <= 1:
            raise ConfigError(f"data.max_skipped: expected a fraction in [0, 1], e.g. 0.01; "
                              f"received {skipped!r}")
        frac = self.test_fraction
        if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 < frac < 1:
            raise ConfigError(f"data.test_fraction: expected a number in (0, 1), e.g. 0.2; "
                              f"received {frac!r}")
        _check_int(self.seed, "data.seed", minimum=0)
        if self.n_samples is not None:
            _check_int(self.n_samples, "data.n_samples")
        _check_int(self.patch_size, "data.patch_size", minimum=2)


@dataclass(frozen=True)
class NetworkConfig:
    """Input shape, layer specs and loss; validated by building the network once.

    >>> from rapydli.layers import Dense
    >>> NetworkConfig((4,), (Dense(3),), "mse").build().n_params
    15
    """

    input_shape: tuple[int, ...]  #: one sample, no batch axis: ``(C, H, W)`` or ``(features,)``
    layers: tuple[Layer, ...]
    loss: str = "softmax_cross_entropy"

    def __post_init__(self):
        shape = _tupled(self.input_shape)
        if (not isinstance(shape, tuple) or len(shape) not in (1, 3)
                or not all(_is_int(n) and n > 0 for n in shape)):
            raise ConfigError("network.input_shape: expected 1 or 3 positive ints, "
                              f"(features,) or (channels, rows, cols); received {self.input_shape!r}")
        object.__setattr__(self, "input_shape", shape)
        object.__setattr__(self, "layers", tuple(self.layers))
        if not isinstance(self.loss, str):
            raise ConfigError(f"network.loss: expected a loss name; received {self.loss!r}")
        try:
            self.build()  # shape-checks every layer now: ShapeError names the layer at fault
        except ConfigError as exc:
            raise ConfigError(f"network: {exc}") from None

    def build(self) -> Sequential:
        """The :class:`~rapydli.network.Sequential` network; layers unnamed in the config are
        named by position, ``"0"``, ``"1"``, ..."""
        return Sequential(list(self.layers), self.input_shape, self.loss)


@dataclass(frozen=True)
class OptimizerConfig:
    """Holds the built optimizer spec (an :class:`~rapydli.optim.SGD`)."""

    optimizer: optim.SGD = field(default_factory=optim.SGD)

    def __post_init__(self):
        if not isinstance(self.optimizer, tuple(optim.OPTIMIZERS.values())):
            raise ConfigError(f"optimizer: expected an optimizer spec such as SGD(lr=0.1); "
                              f"received {self.optimizer!r}")

    def build(self) -> optim.SGD:
        return self.optimizer


@dataclass(frozen=True)
class TrainConfig:
    """Training-loop settings.

    >>> TrainConfig(epochs=5).dtype
    'float32'
    """

    epochs: int = 10
    batch_size: int = 64
    seed: int = 0  #: seeds parameter initialisation and batch shuffling
    dtype: str = "float32"  #: ``"float32"`` or ``"float64"``, for parameters and data
    eval_every: int = 1  #: evaluate on the test split every this many epochs
    checkpoint_every: int | None = None  #: steps between checkpoints (``None``: every epoch)
    keep_checkpoints: int = 3  #: newest checkpoints kept in the run directory

    def __post_init__(self):
        if self.checkpoint_every is not None:
            _check_int(self.checkpoint_every, "train.checkpoint_every")
        _check_int(self.keep_checkpoints, "train.keep_checkpoints")
        _check_int(self.epochs, "train.epochs")
        _check_int(self.batch_size, "train.batch_size")
        _check_int(self.seed, "train.seed", minimum=0)
        _check_choice(self.dtype, DTYPES, "train.dtype", "dtype")
        _check_int(self.eval_every, "train.eval_every")


def _items(value: Any, where: str, example: str) -> tuple:
    if isinstance(value, Mapping):
        return tuple(value.items())
    if isinstance(value, (tuple, list)) and all(
            isinstance(v, (tuple, list)) and len(v) == 2 for v in value):
        return tuple(tuple(v) for v in value)
    raise ConfigError(f"{where}: expected a mapping such as {example}; received {value!r}")


def _normalise_mesh(mesh: Any) -> tuple[tuple[str, int], ...]:
    items = _items(mesh, "placement.mesh", "{data: 2, model: 2}")
    seen = []
    for axis, size in items:
        _check_choice(axis, MESH_AXES, "placement.mesh", "mesh axis")
        if axis in seen:
            raise ConfigError(f"placement.mesh: axis {axis!r} given twice; received {mesh!r}")
        seen.append(axis)
        _check_int(size, f"placement.mesh.{axis}")
    return items


def _normalise_overrides(layers: Any, mesh_axes: tuple[str, ...]) -> tuple[tuple[str, Tiling], ...]:
    items = _items(layers, "placement.layers", '{"3": {batch: data, features: model}}')
    out = []
    for name, tiling in items:
        where = f"placement.layers[{str(name)!r}]"
        if isinstance(tiling, Mapping):
            check_keys(tiling, ("batch", "features", "channels", "rows", "cols"), where)
            tiling = Tiling(**{k: _tupled(v) for k, v in tiling.items()})
        if not isinstance(tiling, Tiling):
            raise ConfigError(f"{where}: expected a tiling such as {{batch: data, features: "
                              f"model}}; received {tiling!r}")
        for axis in tiling.mesh_axes:
            if axis not in mesh_axes:
                raise ConfigError(f"{where}: tiling names mesh axis {axis!r}, not in the mesh; "
                                  f"expected one of {', '.join(map(repr, mesh_axes))}")
        out.append((str(name), tiling))
    return tuple(out)


@dataclass(frozen=True)
class PlacementConfig:
    """A preset, a mesh ``((axis, size), ...)`` and per-layer tilings ``((name, Tiling), ...)``.

    ``mesh=None`` takes the preset's default (:data:`DEFAULT_MESH`); dicts are accepted for
    ``mesh`` and ``layers``.

    >>> PlacementConfig("hybrid", {"data": 1, "model": 2}).build()
    Placement(mesh=Mesh(data=1, model=2), rule='hybrid', overrides=())
    """

    preset: str = "single"
    mesh: tuple[tuple[str, int], ...] | None = None
    layers: tuple[tuple[str, Tiling], ...] = ()

    def __post_init__(self):
        _check_choice(self.preset, tuple(PRESET_RULES), "placement.preset", "preset")
        mesh = DEFAULT_MESH[self.preset] if self.mesh is None else _normalise_mesh(self.mesh)
        object.__setattr__(self, "mesh", mesh)
        names = tuple(axis for axis, _ in mesh)
        missing = [a for a in PRESET_AXES[self.preset] if a not in names]
        if missing:
            need = " and ".join(map(repr, PRESET_AXES[self.preset]))
            raise ConfigError(
                f"placement.mesh: preset {self.preset!r} cuts along mesh axes {need}; received "
                f"mesh {dict(mesh)} without {', '.join(map(repr, missing))}. Add it, e.g. "
                f"--mesh {mesh_string(DEFAULT_MESH[self.preset])}")
        object.__setattr__(self, "layers", _normalise_overrides(self.layers, names))

    @property
    def mesh_string(self) -> str:
        """The mesh in ``--mesh`` form, e.g. ``"data=1,model=2"``."""
        return mesh_string(self.mesh)

    def build(self) -> Placement:
        return Placement(Mesh(**dict(self.mesh)), PRESET_RULES[self.preset], self.layers)


@dataclass(frozen=True)
class Config:
    """A whole run: data, network, optimizer, training loop and placement."""

    data: DataConfig
    network: NetworkConfig
    optimizer: OptimizerConfig
    train: TrainConfig
    placement: PlacementConfig

    def __post_init__(self):
        net = self.network.build()
        names = [layer.name for layer in net.layers]
        for name, _ in self.placement.layers:
            if name not in names:
                raise ConfigError(f"placement.layers: no layer named {name!r}; expected one of "
                                  f"{', '.join(map(repr, names))} (layers are named by position "
                                  "unless given a name)")
        placement = self.placement.build()
        for layer, (_, out_shape) in zip(net.layers, net.shapes):
            placement.tiling_for(layer, len(out_shape) + 1)  # PlacementError names the layer


# ----------------------------------------------------------------------------- parsing
def _parse_network(raw: Any) -> NetworkConfig:
    legal = ("input_shape", "layers", "loss")
    raw = check_keys(raw, legal, "network")
    hint = " (input_shape is one sample's shape without the batch axis, e.g. [1, 8, 8])"
    shape = _require(raw, "input_shape", "network", legal, hint)
    specs = _require(raw, "layers", "network", legal)
    if not isinstance(specs, list) or not specs:
        raise ConfigError(f"network.layers: expected a non-empty list of layers such as "
                          f"[{{type: Dense, units: 10}}]; received {specs!r}")
    built = []
    for i, spec in enumerate(specs):
        where = f"network.layers[{i}]"
        if isinstance(spec, Mapping):
            spec = {k: _tupled(v) for k, v in spec.items()}
        built.append(layers_mod.from_config(spec, where=where))
    return NetworkConfig(_tupled(shape), tuple(built), raw.get("loss", "softmax_cross_entropy"))


def _parse_optimizer(raw: Any) -> OptimizerConfig:
    name = raw.get("name", "sgd") if isinstance(raw, Mapping) else "sgd"
    _check_choice(name, tuple(optim.OPTIMIZERS), "optimizer.name", "optimizer")
    fields = dataclasses.fields(optim.OPTIMIZERS[name])
    raw = check_keys(raw, ("name", *(f.name for f in fields)), "optimizer")
    for f in fields:
        value = raw.get(f.name, f.default)
        ok = isinstance(value, bool) if isinstance(f.default, bool) else (
            isinstance(value, (int, float)) and not isinstance(value, bool))
        if not ok:
            what = "true or false" if isinstance(f.default, bool) else "a number"
            raise ConfigError(f"optimizer.{f.name}: expected {what}; received {value!r}")
    return OptimizerConfig(optim.from_config(raw))


def _parse_section(cls: type, raw: Any, where: str):
    legal = tuple(f.name for f in dataclasses.fields(cls))
    return cls(**{k: _tupled(v) for k, v in check_keys(raw, legal, where).items()})


def parse_config(mapping: Any, source: str = "<dict>") -> Config:
    """Validate a mapping (as read from YAML) into a :class:`Config`.

    Parameters
    ----------
    mapping : Mapping
        Top-level keys ``data``, ``network``, ``optimizer``, ``train``, ``placement``; only
        ``network`` is required.
    source : str
        Where the mapping came from, named in every error message.

    Raises
    ------
    ConfigError, ShapeError, PlacementError
        Naming ``source`` and the dotted path of the field at fault.

    Examples
    --------
    >>> cfg = parse_config({"network": {"input_shape": [1, 8, 8], "layers": [
    ...     {"type": "Flatten"}, {"type": "Dense", "units": 10}]},
    ...     "placement": {"preset": "data_parallel"}})
    >>> cfg.placement.build().mesh
    Mesh(data=2)
    """
    try:
        if not isinstance(mapping, Mapping):
            raise ConfigError(f"expected a mapping with top-level keys {', '.join(SECTIONS)}; "
                              f"received {type(mapping).__name__}")
        raw = check_keys(mapping, SECTIONS, "top level")
        _require(raw, "network", "top level", SECTIONS, " (only network is required)")
        return Config(
            data=_parse_section(DataConfig, raw.get("data"), "data"),
            network=_parse_network(raw["network"]),
            optimizer=_parse_optimizer(raw.get("optimizer")),
            train=_parse_section(TrainConfig, raw.get("train"), "train"),
            placement=_parse_section(PlacementConfig, raw.get("placement"), "placement"),
        )
    except RapydliError as exc:
        raise type(exc)(f"config {source!r}: {exc}") from None


def load_config(path: str | Path) -> Config:
    """Read and validate a YAML config file.

    Parameters
    ----------
    path : str or Path
        A YAML file such as ``examples/digits_cnn.yaml``.

    Raises
    ------
    ConfigError
        If the file is missing, is not valid YAML (the message gives the line) or holds a bad
        value (the message gives the dotted path of the field).

    Examples
    --------
    >>> cfg = load_config("examples/digits_cnn.yaml")  # doctest: +SKIP
    >>> cfg.network.build().output_shape  # doctest: +SKIP
    (10,)
    """
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config {str(path)!r}: file not found; expected a YAML file such as "
                          "examples/digits_cnn.yaml") from None
    except OSError as exc:
        raise ConfigError(f"config {str(path)!r}: cannot be read ({exc.strerror})") from None
    try:
        mapping = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f", line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"config {str(path)!r}{line}: invalid YAML: {problem}") from None
    return parse_config(mapping, source=str(path))


# ----------------------------------------------------------------------------- --mesh
def mesh_string(mesh: Any) -> str:
    """``(("data", 2), ("model", 2))`` or ``{"data": 2, "model": 2}`` -> ``"data=2,model=2"``.

    >>> mesh_string({"data": 1, "model": 2})
    'data=1,model=2'
    """
    items = mesh.items() if isinstance(mesh, Mapping) else mesh
    return ",".join(f"{axis}={size}" for axis, size in items)


def parse_mesh(text: str) -> tuple[tuple[str, int], ...]:
    """Parse a ``--mesh`` string such as ``"data=2,model=2"`` into ``(("data", 2), ...)``.

    >>> parse_mesh("data=2, model=4")
    (('data', 2), ('model', 4))
    """
    expected = "expected the form data=2,model=2 (axes 'data' and 'model', positive sizes)"
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"--mesh: {expected}; received {text!r}")
    items = []
    for part in text.split(","):
        axis, sep, size = (s.strip() for s in part.partition("="))
        if not sep or axis not in MESH_AXES or not size.isdigit() or int(size) < 1:
            raise ConfigError(f"--mesh: bad entry {part.strip()!r}; {expected}; "
                              f"received {text!r}")
        if axis in dict(items):
            raise ConfigError(f"--mesh: axis {axis!r} given twice; {expected}; received {text!r}")
        items.append((axis, int(size)))
    return tuple(items)


def with_mesh(config: Config, mesh: str) -> Config:
    """A copy of ``config`` whose placement uses the mesh of a ``--mesh`` string.

    Examples
    --------
    >>> cfg = parse_config({"network": {"input_shape": [4], "layers": [
    ...     {"type": "Dense", "units": 3}]}, "placement": {"preset": "hybrid"}})
    >>> with_mesh(cfg, "data=2,model=2").placement.mesh
    (('data', 2), ('model', 2))
    """
    placement = dataclasses.replace(config.placement, mesh=parse_mesh(mesh))
    return dataclasses.replace(config, placement=placement)
