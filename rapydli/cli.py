"""The ``rapydli`` command shell.

``rapydli train CONFIG.yaml [--scheduler ADDR] [--out DIR] [--mesh data=1,model=2]``
    trains on an embedded LocalCluster (or the Dask scheduler at ADDR), with a progress bar,
    one JSON line per epoch in ``DIR/metrics.jsonl``, a loss curve ``DIR/loss.png``, atomic
    checkpoints ``DIR/ckpt-<step>.npz`` (the last few kept) and ``DIR/report.json`` (lost
    workers, skipped records); ``--resume DIR`` continues a stopped run.
``rapydli plan CONFIG.yaml [--mesh data=2,model=2] [--batch N] [--draw FILE.png]``
    prints the step graph's task count, communication ops and bytes moved between each pair
    of workers, and draws the graph.
``rapydli tune CONFIG.yaml [--batch N] [--cache FILE] [--exclude param=value ...]``
    times each kernel's instantiations at the network's tile shapes and caches the fastest;
    training then uses the cache.
``rapydli export RUN_DIR [--format onnx|npz] [-o FILE]``
    writes the run's latest weights as an ONNX model (or plain npz weights).
``rapydli visualize RUN_DIR --layer L --unit U``
    draws a unit's top stimuli from a data set and its optimal (norm-1) stimulus.
``rapydli simulate CONFIG.yaml --cluster CLUSTER.yaml [--mesh ...] [--search]``
    predicts step time, compute/communication split and memory on a described cluster.
``rapydli data import SRC DEST [--format lmdb|zarr|hdf5] [--shards N] [--partition P]``
    converts digits, an npy folder or an image folder into a sharded store;
    ``rapydli data inspect DEST`` prints its counts, shapes, label histogram and shard sizes.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from rapydli.errors import RapydliError
from rapydli.scheduler.engine import EXCHANGES  # loaded by ``import rapydli`` anyway


def _load(args):
    from rapydli.config import load_config, with_mesh

    config = load_config(args.config)
    if args.mesh:
        config = with_mesh(config, args.mesh)
    return config


def _sources(config, network):
    """Training source and validation data the config names, and a line describing them."""
    from rapydli.storage.datasets import load_dataset
    from rapydli.storage.loader import StoreSource
    from rapydli.storage.policies import Subset

    data = config.data
    if data.store is None:
        ds = load_dataset(data, config.train.dtype)
        return ((ds.x_train, ds.y_train), (ds.x_test, ds.y_test),
                f"{data.name} ({len(ds.x_train)} train / {len(ds.x_test)} test)")
    train_sub, test_sub = (Subset(ranges=data.ranges, labels=data.labels, fraction=s.fraction,
                                  seed=data.seed) for s in Subset.split(data.test_fraction, data.seed))
    kwargs = dict(storage_options=data.storage_options, distribution=data.distribution,
                  threshold=data.max_skipped)
    train = StoreSource(data.store, subset=train_sub, **kwargs)
    test = StoreSource(data.store, subset=test_sub, name="test", **kwargs)
    _check_store(train.store, network)
    return (train, None), test, (f"store {data.store} ({train.store.format}, {len(train.store)} "
                                 f"records in {len(train.store.shards)} shards; test by hash of "
                                 f"key, {data.test_fraction:.0%})")


def _check_store(store, network) -> None:
    from rapydli.errors import ShapeError

    if tuple(store.spec.shape) != tuple(network.input_shape):
        raise ShapeError(f"data.store {store.url!r}: records have shape {tuple(store.spec.shape)}; "
                         f"network.input_shape is {tuple(network.input_shape)}. Set "
                         "network.input_shape to the record shape or re-import the data")


def cmd_train(args) -> int:
    from dataclasses import replace

    from rapydli.scheduler.cluster import connect
    from rapydli.storage.checkpoint import Checkpoints, load_checkpoint
    from rapydli.training import fit

    config = _load(args)
    if args.epochs:
        config = replace(config, train=replace(config.train, epochs=args.epochs))
    network, placement = config.network.build(), config.placement.build()
    resume = load_checkpoint(args.resume) if args.resume else None
    (x, y), validation, described = _sources(config, network)
    out = Path(args.out or args.resume or Path("runs") / Path(args.config).stem)
    out.mkdir(parents=True, exist_ok=True)
    print(network.summary())
    print(f"placement: {config.placement.preset} on {placement.mesh!r}; data: {described}; "
          f"run directory: {out}")
    metrics_path = out / "metrics.jsonl"
    rows = resume[2]["history"] if resume else []
    if resume:
        meta = resume[2]
        print(f"resuming {args.resume} at epoch {meta['epoch']}, step {meta['step']}")
    metrics_path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    client = connect(args.scheduler, n_workers=placement.mesh.size, cluster=args.cluster)
    started = time.perf_counter()

    def on_epoch(row):
        with metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    try:
        history = fit(network, x, y, placement=placement, optimizer=config.optimizer.build(),
                      epochs=config.train.epochs, batch_size=config.train.batch_size,
                      seed=config.train.seed, validation_data=validation, client=client,
                      dtype=config.train.dtype, progress=not args.no_progress,
                      on_epoch=on_epoch, steps_per_task=args.steps_per_task,
                      exchange=args.exchange, eval_every=config.train.eval_every,
                      checkpoints=Checkpoints(out, config.train.keep_checkpoints),
                      checkpoint_every=config.train.checkpoint_every, resume=resume)
    finally:
        if args.scheduler is None and hasattr(client, "cluster"):
            cluster = client.cluster
            client.close()
            cluster.close()
    seconds = time.perf_counter() - started
    _write_report(out, history, seconds, args.config)
    _plot_losses(history, out / "loss.png")
    if not hasattr(x, "epoch"):  # unsupervised networks: filters.png and unsupervised.json
        from rapydli.unsupervised import report_unsupervised

        report_unsupervised(out, network, history.params, x)
    last = history.epochs[-1]
    tested = f", test accuracy {last['test_accuracy']:.4f}" if "test_accuracy" in last else ""
    print(f"done in {seconds:.1f}s: loss {last['loss']:.4f}, train accuracy "
          f"{last['train_accuracy']:.4f}{tested}; {last['samples_per_s']:.0f} samples/s")
    print(f"wrote {metrics_path}, {out / 'report.json'} and checkpoints {out}/ckpt-*.npz")
    return 0


def _write_report(out: Path, history, seconds: float, config: str) -> None:
    """``report.json``: final metrics, lost workers and recoveries, skipped records."""
    from rapydli.storage.atomic import atomic_write

    report = {"config": str(config), "seconds": seconds, "final": history.epochs[-1],
              "events": history.events, "data": history.data_report}
    atomic_write(out / "report.json", lambda f: f.write(json.dumps(report, indent=1).encode()))
    for event in history.events:
        print(f"note: {event['event']} at step {event['at_step']} ({event['error']}); resumed "
              f"from step {event['resumed_from_step']}")
    if history.data_report and history.data_report.get("n_skipped"):
        print(f"note: skipped {history.data_report['n_skipped']} unusable record(s); see "
              f"{out / 'report.json'}")


def _plot_losses(history, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
    tested = [row for row in history.epochs if "test_loss" in row]  # every eval_every epochs
    ax1.plot(history["epoch"], history["loss"], label="train")
    ax2.plot(history["epoch"], history["train_accuracy"], label="train")
    if tested:
        epochs = [row["epoch"] for row in tested]
        ax1.plot(epochs, [row["test_loss"] for row in tested], "o-", label="test")
        ax2.plot(epochs, [row["test_accuracy"] for row in tested], "o-", label="test")
    ax1.set(xlabel="epoch", ylabel="loss", yscale="log")
    ax2.set(xlabel="epoch", ylabel="accuracy")
    for ax in (ax1, ax2):
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def cmd_plan(args) -> int:
    from rapydli.graph.lower import lower
    from rapydli.graph.report import draw, format_summary, summarize

    config = _load(args)
    network, placement = config.network.build(), config.placement.build()
    graph = lower(network, placement, args.batch or config.train.batch_size, args.mode,
                  config.optimizer.build(), config.train.dtype)
    print(format_summary(summarize(graph)))
    if args.draw:
        draw(graph, args.draw)
        print(f"drew the step graph to {args.draw}")
    return 0


def cmd_tune(args) -> int:
    """``rapydli tune CONFIG.yaml``: autotune the network's kernels and write the cache."""
    from rapydli.config import load_config
    from rapydli.errors import ConfigError
    from rapydli.kernels.autotune import Cache
    from rapydli.tune import format_table, tune_network

    soft: dict = {}
    for item in args.exclude or ():
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise ConfigError(f"--exclude: expected param=value (e.g. chunk=16); received {item!r}")
        for kind in (int, float, str):
            try:
                soft.setdefault(name, []).append(kind(value))
                break
            except ValueError:
                continue
    config = load_config(args.config)
    network, placement = config.network.build(), config.placement.build()
    cache = Cache(args.cache)  # None: $RAPYDLI_AUTOTUNE_CACHE or ~/.cache/rapydli/autotune.json
    batch = args.batch or config.train.batch_size
    print(f"tuning {args.config} at batch {batch} ({config.train.dtype}, tiles of placement "
          f"{config.placement.preset} on {placement.mesh!r}); cache {cache.path}")
    rows = tune_network(network, batch, config.train.dtype, cache=cache, soft=soft or None,
                        repeats=args.repeats, placement=placement)
    print(format_table(rows))
    print(f"wrote {len(rows)} choices to {cache.path}")
    return 0


def cmd_export(args) -> int:
    """``rapydli export RUN_DIR --format onnx -o model.onnx``."""
    from rapydli.storage.export import export_run

    path = export_run(args.run_dir, args.format, args.output)
    print(f"wrote {path} ({args.format}) from the latest checkpoint in {args.run_dir}")
    return 0


def _steps_per_task(text: str) -> int | str:
    """``--steps-per-task``: a positive integer or ``auto``."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {text!r}")
    return value


def _options(text: str | None) -> dict | None:
    """``--storage-options '{"anon": true}'`` as a dict."""
    from rapydli.errors import ConfigError

    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--storage-options: expected a JSON object such as "
                          f"'{{\"anon\": true}}'; received {text!r} ({exc})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"--storage-options: expected a JSON object; received {text!r}")
    return value


def cmd_data_import(args) -> int:
    """``rapydli visualize RUN_DIR --layer L --unit U``
    draws a unit's top stimuli from a data set and its optimal (norm-1) stimulus.
``rapydli simulate CONFIG.yaml --cluster CLUSTER.yaml [--mesh ...] [--search]``
    predicts step time, compute/communication split and memory on a described cluster.
``rapydli data import SRC DEST [--format F] [--shards N] [--partition P]``."""
    from rapydli.storage.importer import format_inspect, import_dataset, inspect_store
    from rapydli.storage.quality import QualityReport

    report = QualityReport()
    options = _options(args.storage_options)
    store = import_dataset(args.src, args.dest, args.format, args.shards, args.partition,
                           options, overwrite=args.overwrite, report=report)
    print(f"imported {len(store)} records from {args.src} into {args.dest} ({args.format}, "
          f"{len(store.shards)} shards, partition {args.partition})")
    print(report)
    print(format_inspect(inspect_store(args.dest, options)))
    return 0


def cmd_data_inspect(args) -> int:
    """``rapydli data inspect DEST``: counts, shapes, label histogram, shard sizes."""
    from rapydli.storage.importer import format_inspect, inspect_store

    print(format_inspect(inspect_store(args.dest, _options(args.storage_options))))
    return 0


def _data_parser(sub) -> None:
    from rapydli.storage.policies import PARTITIONS
    from rapydli.storage.records import FORMATS

    data = sub.add_parser("data", help="import and inspect sharded record stores")
    verbs = data.add_subparsers(dest="data_command", required=True)
    imp = verbs.add_parser("import", help="convert digits, an npy folder or an image folder "
                           "(labels from sub-folder names) into a sharded store")
    imp.add_argument("src", help="'digits', a folder, or another store (path or URL)")
    imp.add_argument("dest", help="store location: a path, memory://..., s3://bucket/prefix")
    imp.add_argument("--format", default="zarr", choices=FORMATS)
    imp.add_argument("--shards", type=int, default=4, help="number of shards (default 4)")
    imp.add_argument("--partition", default="contiguous", choices=PARTITIONS,
                     help="how records fall into shards")
    imp.add_argument("--overwrite", action="store_true", help="replace a store at DEST")
    imp.add_argument("--storage-options", help="fsspec options as JSON, e.g. endpoint_url")
    imp.set_defaults(func=cmd_data_import)
    ins = verbs.add_parser("inspect", help="counts, shapes, label histogram, shard sizes")
    ins.add_argument("dest")
    ins.add_argument("--storage-options", help="fsspec options as JSON")
    ins.set_defaults(func=cmd_data_inspect)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rapydli", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train the network a config describes")
    train.add_argument("config")
    train.add_argument("--scheduler", help="address of a running Dask scheduler, tcp://host:8786")
    train.add_argument("--out", help="run directory (default: runs/<config name>)")
    train.add_argument("--cluster", default="local", choices=("local", "local-cuda", "slurm", "pbs"),
                       help="kind of cluster to start when no --scheduler is given: worker "
                            "processes here (local), one per GPU (local-cuda, needs dask-cuda), "
                            "or batch jobs (slurm, pbs; needs dask-jobqueue)")
    train.add_argument("--steps-per-task", type=_steps_per_task, default="auto",
                       help="unroll this many training steps into one task graph; 'auto' "
                            "(default): about two seconds of work per task")
    train.add_argument("--exchange", default="auto", choices=EXCHANGES,
                       help="how tiles travel between workers: direct (worker to worker "
                            "inside each worker's step task; what 'auto' picks with more than "
                            "one worker) or graph (each tile a Dask dependency; for trainings "
                            "started from several processes on the same workers)")
    train.add_argument("--mesh", help="override the placement mesh, e.g. data=2,model=2")
    train.add_argument("--epochs", type=int, help="override train.epochs")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue the run whose checkpoints "
                       "are in RUN_DIR (same batches as if it had never stopped)")
    train.set_defaults(func=cmd_train)
    plan = sub.add_parser("plan", help="show the step graph a config lowers to")
    plan.add_argument("config")
    plan.add_argument("--mesh", help="override the placement mesh, e.g. data=2,model=2")
    plan.add_argument("--batch", type=int, help="batch size (default: train.batch_size)")
    plan.add_argument("--mode", default="train", choices=("train", "grad", "eval", "predict"))
    plan.add_argument("--draw", metavar="FILE.png", help="draw the graph to this file")
    plan.set_defaults(func=cmd_plan)
    tune = sub.add_parser("tune", help="autotune the kernels of the network a config describes")
    tune.add_argument("config")
    tune.add_argument("--batch", type=int, help="batch size (default: train.batch_size)")
    tune.add_argument("--cache", metavar="FILE", help="cache file (default: $RAPYDLI_AUTOTUNE_CACHE "
                      "or ~/.cache/rapydli/autotune.json)")
    tune.add_argument("--exclude", nargs="*", metavar="PARAM=VALUE", action="extend",
                      help="exclude these choices, e.g. --exclude chunk=16 algorithm=einsum")
    tune.add_argument("--repeats", type=int, default=5, help="timed calls per candidate (median)")
    tune.set_defaults(func=cmd_tune)
    export = sub.add_parser("export", help="export a trained run for inference elsewhere")
    export.add_argument("run_dir", help="run directory holding checkpoints (rapydli train --out)")
    export.add_argument("--format", default="onnx", choices=("onnx", "npz"))
    export.add_argument("-o", "--output", help="output file (default: RUN_DIR/model.FORMAT)")
    export.set_defaults(func=cmd_export)
    _data_parser(sub)
    from rapydli.scheduler.simulate_cli import add_simulate_parser
    from rapydli.visualize import add_visualize_parser

    add_visualize_parser(sub)
    add_simulate_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except RapydliError as exc:
        print(f"rapydli: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
