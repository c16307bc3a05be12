"""``rapydli simulate``: predict a training step of a config on a described cluster.

``rapydli simulate CONFIG.yaml --cluster CLUSTER.yaml [--mesh data=2,model=2] [--batch N]``
    prints the predicted step time, compute, communication (total and exposed), and memory per
    device of the config's placement (with ``--mesh`` replacing its mesh);
``... --search [--top K]``
    ranks every preset over the mesh shapes that fit the cluster, fastest fitting first.

Nothing runs on a cluster: see :mod:`rapydli.scheduler.cost` for the model.
"""
from __future__ import annotations

import argparse

from rapydli.scheduler.cost import EXCHANGES


def add_simulate_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``simulate`` subcommand to ``rapydli``'s subparsers; returns its parser."""
    sim = subparsers.add_parser(
        "simulate", help="predict step time and memory of a config on a described cluster")
    sim.add_argument("config")
    sim.add_argument("--cluster", required=True, metavar="CLUSTER.yaml",
                     help="cluster description, e.g. examples/clusters/gpu_infiniband.yaml")
    sim.add_argument("--mesh", help="override the placement mesh, e.g. data=2,model=2")
    sim.add_argument("--batch", type=int, help="batch size (default: train.batch_size)")
    sim.add_argument("--search", action="store_true",
                     help="rank every preset over the mesh shapes that fit the cluster")
    sim.add_argument("--top", type=int, default=0, metavar="K",
                     help="with --search, show only the K best (default: all)")
    sim.add_argument("--exchange", choices=EXCHANGES, default="direct",
                     help="how tiles travel between workers (as Engine(exchange=...)); "
                          "'direct' is the engine's default on a cluster (one worker or "
                          "--unfused: graph)")
    sim.add_argument("--unfused", action="store_true",
                     help="simulate one Dask task per tile op (as Engine(fused=False))")
    sim.set_defaults(func=cmd_simulate)
    return sim


def cmd_simulate(args) -> int:
    """``rapydli simulate CONFIG.yaml --cluster CLUSTER.yaml [--search]``."""
    from rapydli.config import load_config, with_mesh
    from rapydli.errors import ConfigError
    from rapydli.scheduler.cost import (format_prediction, format_ranking, load_cluster, search,
                                        simulate)

    config = load_config(args.config)
    if args.mesh:
        config = with_mesh(config, args.mesh)
    cluster = load_cluster(args.cluster)
    network = config.network.build()
    batch = args.batch or config.train.batch_size
    if batch < 1:
        raise ConfigError(f"--batch: expected a positive int; received {batch}")
    optimizer, dtype = config.optimizer.build(), config.train.dtype
    print(cluster.describe())
    if args.search:
        ranked = search(network, batch, cluster, optimizer, dtype, fused=not args.unfused,
                        exchange=args.exchange)
        shown = ranked[:args.top] if args.top > 0 else ranked
        print(f"batch {batch}: {len(ranked)} candidate placements, fastest that fits first\n")
        print(format_ranking(shown))
        if ranked:
            print(f"\nbest:\n{format_prediction(ranked[0])}")
        return 0
    prediction = simulate(network, config.placement.build(), batch, cluster, optimizer, dtype,
                          fused=not args.unfused, exchange=args.exchange)
    print(format_prediction(prediction))
    return 0
