"""The ``rapydli`` command shell.

``rapydli train CONFIG.yaml [--scheduler ADDR] [--out DIR] [--mesh data=1,model=2]``
    trains on an embedded LocalCluster (or the Dask scheduler at ADDR), with a progress bar,
    one JSON line per epoch in ``DIR/metrics.jsonl``, a loss curve ``DIR/loss.png`` and an
    atomic checkpoint ``DIR/checkpoint.npz``.
``rapydli plan CONFIG.yaml [--mesh data=2,model=2] [--batch N] [--draw FILE.png]``
    prints the step graph's task count, communication ops and bytes moved between each pair
    of workers, and draws the graph.
``rapydli tune CONFIG.yaml [--batch N] [--cache FILE] [--exclude param=value ...]``
    times each kernel's instantiations at the network's tile shapes and caches the fastest;
    training then uses the cache.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from rapydli.errors import RapydliError


def _load(args):
    from rapydli.config import load_config, with_mesh

    config = load_config(args.config)
    if args.mesh:
        config = with_mesh(config, args.mesh)
    return config


def cmd_train(args) -> int:
    from rapydli.scheduler.cluster import connect
    from rapydli.storage.checkpoint import save_checkpoint
    from rapydli.storage.datasets import load_dataset
    from rapydli.training import fit

    config = _load(args)
    if args.epochs:
        from dataclasses import replace

        config = replace(config, train=replace(config.train, epochs=args.epochs))
    network, placement = config.network.build(), config.placement.build()
    data = load_dataset(config.data, config.train.dtype)
    out = Path(args.out or Path("runs") / Path(args.config).stem)
    out.mkdir(parents=True, exist_ok=True)
    print(network.summary())
    print(f"placement: {config.placement.preset} on {placement.mesh!r}; data: {config.data.name} "
          f"({len(data.x_train)} train / {len(data.x_test)} test); run directory: {out}")
    client = connect(args.scheduler, n_workers=placement.mesh.size, cluster=args.cluster)
    metrics_path = out / "metrics.jsonl"
    metrics_path.write_text("")
    started = time.perf_counter()

    def on_epoch(row):
        with metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    try:
        history = fit(network, data.x_train, data.y_train, placement=placement,
                      optimizer=config.optimizer.build(), epochs=config.train.epochs,
                      batch_size=config.train.batch_size, seed=config.train.seed,
                      validation_data=(data.x_test, data.y_test), client=client,
                      dtype=config.train.dtype, progress=not args.no_progress,
                      on_epoch=on_epoch, steps_per_task=args.steps_per_task,
                      eval_every=config.train.eval_every)
    finally:
        if args.scheduler is None and hasattr(client, "cluster"):
            cluster = client.cluster
            client.close()
            cluster.close()
    seconds = time.perf_counter() - started
    last = history.epochs[-1]
    save_checkpoint(out, history.params, history.opt_state,
                    {"epoch": last["epoch"], "metrics": last, "config": str(args.config),
                     "network": network.get_config(), "seconds": seconds})
    _plot_losses(history, out / "loss.png")
    print(f"done in {seconds:.1f}s: loss {last['loss']:.4f}, train accuracy "
          f"{last['train_accuracy']:.4f}, test accuracy {last['test_accuracy']:.4f}; "
          f"{last['samples_per_s']:.0f} samples/s")
    print(f"wrote {metrics_path}, {out / 'checkpoint.npz'}")
    return 0


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
    train.add_argument("--steps-per-task", type=int, default=1,
                       help="unroll this many training steps into one task graph")
    train.add_argument("--mesh", help="override the placement mesh, e.g. data=2,model=2")
    train.add_argument("--epochs", type=int, help="override train.epochs")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
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
