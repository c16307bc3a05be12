"""Data throughput (issue 4): records/s of each storage back end against reading the same images
as individual PNG files, the digits CNN's training rate, the rate at which a ``StoreSource``
delivers training batches, and training fed from a store against training from arrays.

Data: scikit-learn's 1,797 digits, quantised to 8 bits (so PNG files and arrays hold the same
values) and repeated to ``--records`` records, upscaled for the back-end table to ``--size`` x
``--size`` pixels with ``np.kron``; the CNN trains on ``--train-records`` 8x8 records. All is
written under ``--workdir`` (a temporary directory by default); nothing is downloaded.

1. An image folder (one PNG file per record, one sub-folder per label) and an npy folder of the
   same records; an LMDB store imported from the npy folder and zarr and HDF5 stores from the
   LMDB store, with ``rapydli.storage.importer.import_dataset`` (``--shards`` shards).
2. Every record read with ``rapydli.storage.records.load_shard(url, shard)`` over all shards of
   each back end (files in the page cache: warm-cache figures); rounds alternate the back ends.
3. The digits CNN of ``examples/digits_cnn.yaml`` (network, optimizer, batch size) trained by
   ``rapydli.fit`` in-process on arrays: samples/s of the epochs after the first. The loader: a
   ``StoreSource`` over an LMDB store of the same records iterated through whole epochs with an
   in-process ``Engine``, each window's ``x`` and ``y`` brought out, no step run.
4. ``fit`` fed by that ``StoreSource`` against ``fit`` on the arrays, in-process and (unless
   ``--no-cluster``) on a LocalCluster of 1 worker process with 2 threads, where shard reads
   can run beside training steps. Each round runs both fits (and a loader epoch), and ratios
   are taken within a round, so that noise from other jobs hits both sides of a ratio.

This process runs with 1 BLAS / OpenMP thread, so in-process figures are also given per
CPU-second of this process ("CPU" columns), which other jobs on the machine hardly change;
wall-clock figures are what ``fit`` reports. Medians throughout.

Goals: LMDB >= 3x individual PNG files; loader >= 5x training. No timing is asserted.

    python benchmarks/data_throughput.py [--records 8000] [--rounds 3] [--workdir DIR]
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import shlex
import sys
import tempfile
import time

import _common as C

#: rows of the read table, in print order: back ends, then the PNG files read again through
#: one opened store (the folder listed once rather than once per shard)
ROWS = ("lmdb", "zarr", "hdf5", "npy", "images", "images-once")
LABELS = {"lmdb": "LMDB", "zarr": "zarr", "hdf5": "HDF5", "npy": "npy folder",
          "images": "individual PNG files", "images-once": "PNG files, folder listed once"}


class Clock:
    """Wall and CPU seconds (this process, all threads) since it was made."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def read(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


# --- data ---------------------------------------------------------------------------------


def digits_u8(n: int, size: int):
    """``(x, y)``: ``n`` digits (the 1,797 repeated) as uint8 ``(n, 1, size, size)``, labels."""
    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()
    q = np.round(digits.images * (255 / 16)).astype(np.uint8)  # (1797, 8, 8), values 0..255
    if size != 8:
        q = np.kron(q, np.ones((1, size // 8, size // 8), np.uint8))  # (1797, size, size)
    take = np.arange(n) % len(q)
    return q[take][:, None], digits.target[take].astype(np.int64)  # (n, 1, size, size)


def to_float(x_u8):
    """What the image reader decodes: float32 in [0, 1], exactly."""
    import numpy as np

    return x_u8.astype(np.float32) / np.float32(255.0)


def write_folders(root: str, x_u8, y) -> tuple[str, str]:
    """An image folder (PNG) and an npy folder of the same records: ``<root>/<kind>/<label>/``."""
    import numpy as np
    from PIL import Image

    images, npys = os.path.join(root, "images"), os.path.join(root, "npy")
    for label in np.unique(y):
        os.makedirs(os.path.join(images, str(label)), exist_ok=True)
        os.makedirs(os.path.join(npys, str(label)), exist_ok=True)
    x = to_float(x_u8)
    for i, label in enumerate(y):
        name = os.path.join(str(label), f"rec-{i:06d}")
        Image.fromarray(x_u8[i, 0], mode="L").save(os.path.join(images, name + ".png"))
        np.save(os.path.join(npys, name + ".npy"), x[i])
    return images, npys


def build_sources(root: str, n: int, size: int, shards: int) -> dict[str, str]:
    """URL of each back end of the read table, all holding the same ``n`` records."""
    from rapydli.storage.importer import import_dataset

    x_u8, y = digits_u8(n, size)
    images, npys = write_folders(root, x_u8, y)
    urls = {fmt: os.path.join(root, f"store-{fmt}") for fmt in ("lmdb", "zarr", "hdf5")}
    # a folder lists by class: round robin mixes the classes in every shard
    import_dataset(npys, urls["lmdb"], format="lmdb", shards=shards, partition="round_robin")
    for fmt in ("zarr", "hdf5"):  # the same records, read faster from LMDB than from files
        import_dataset(urls["lmdb"], urls[fmt], format=fmt, shards=shards)
    return {**urls, "npy": npys, "images": images, "images-once": images}


def training_store(root: str, x, y, shards: int) -> str:
    """An LMDB store of the 8x8 training records ``(x, y)`` in ``shards`` contiguous shards."""
    import numpy as np

    from rapydli.storage.records import Record, RecordSpec, write_store

    spec = RecordSpec(x.shape[1:], "float32", classes=tuple(str(c) for c in range(10)))
    parts = np.array_split(np.arange(len(x)), shards)
    by_shard = {f"shard-{s:05d}": [Record(f"d-{i:06d}", x[i], int(y[i])) for i in part]
                for s, part in enumerate(parts)}
    url = os.path.join(root, "train-lmdb")
    write_store(url, "lmdb", spec, by_shard)
    return url


def hdf5_copy(url: str, shards: int) -> str:
    """The store at ``url`` imported into HDF5 (same records and shards)."""
    from rapydli.storage.importer import import_dataset

    dest = url.rsplit("-", 1)[0] + "-hdf5"
    import_dataset(url, dest, format="hdf5", shards=shards)
    return dest


# --- reading ------------------------------------------------------------------------------


def read_all(url: str, once: bool = False, limit: int | None = None) -> tuple[float, float, int,
                                                                                float]:
    """Wall and CPU seconds to read every record of ``url`` shard by shard with ``load_shard``
    (which opens the store for each shard, as a worker does) or, with ``once``, through one
    opened store; then records read and the sum of all pixels (equal for every back end).
    ``limit``: read only that many shards (a warm-up)."""
    from rapydli.storage.records import load_shard, open_store

    clock = Clock()
    store = open_store(url)  # the shard list, known to a client beforehand
    if once:
        parts = [store.read_shard(shard) for shard in store.shards[:limit]]
    else:
        clock = Clock()
        parts = [load_shard(url, shard) for shard in store.shards[:limit]]
    wall, cpu = clock.read()
    return wall, cpu, sum(len(p) for p in parts), sum(float(p.x.sum(dtype="f8")) for p in parts)


def read_table(urls: dict[str, str], rounds: int) -> dict[str, dict]:
    """Per row of the table: median ``wall`` and ``cpu`` seconds, records ``n``, pixel ``sum``.
    A warm-up reads one shard of each (libraries loaded, caches filled)."""
    for row in ROWS:
        read_all(urls[row], row == "images-once", limit=1)
    runs: dict[str, list] = {row: [] for row in ROWS}
    for _ in range(rounds):
        for row in ROWS:
            runs[row].append(read_all(urls[row], row == "images-once"))
    return {row: {"wall": C.median([r[0] for r in rs]), "cpu": C.median([r[1] for r in rs]),
                  "n": rs[-1][2], "sum": rs[-1][3]} for row, rs in runs.items()}


# --- training and the loader --------------------------------------------------------------


class WaitedSource:
    """Passes everything to ``source`` and times how long the training loop waits on it:
    per epoch, ``waits`` holds the seconds spent producing its steps (shard reads, window tasks,
    waiting on their results) and ``first`` those before its first step."""

    def __init__(self, source):
        self.source, self.waits, self.first = source, [], []

    def __len__(self) -> int:
        return len(self.source)

    def __getattr__(self, name):  # attach, position, report, materialize
        return getattr(self.source, name)

    def epoch(self, *args, **kwargs):
        steps, waited, first = self.source.epoch(*args, **kwargs), 0.0, True
        while True:
            start = time.perf_counter()
            step = next(steps, None)
            waited += time.perf_counter() - start
            if first:
                self.first.append(waited)
                first = False
            if step is None:
                self.waits.append(waited)
                return
            yield step


def timed_fit(cfg, data: tuple, epochs: int, client) -> tuple[list[dict], list[float]]:
    """``fit`` the config's network on ``data`` (``(x, y)`` or ``(source,)``): its epoch rows
    and the CPU seconds of this process in each epoch after the first."""
    from rapydli import fit

    marks: list[float] = []
    history = fit(cfg.network.build(), *data, optimizer=cfg.optimizer.build(), epochs=epochs,
                  batch_size=cfg.train.batch_size, seed=cfg.train.seed, dtype=cfg.train.dtype,
                  client=client, on_epoch=lambda row: marks.append(time.process_time()))
    return history.epochs, [b - a for a, b in itertools.pairwise(marks)]


def fit_rates(cfg, x, y, store_url: str, epochs: int, client=None) -> dict[str, float]:
    """One fit on the arrays, then one fed by a StoreSource: median samples/s of epochs 2..
    (wall, and per CPU-second), the share of a store-fed epoch the loop waited on the source
    (``wait``) and did so before the epoch's first step (``first``)."""
    from rapydli.storage.loader import StoreSource

    source = WaitedSource(StoreSource(store_url))
    out = {}
    for name, data in (("arrays", (x, y)), ("store", (source,))):
        rows, cpu = timed_fit(cfg, data, epochs, client)
        out[name] = C.median([row["samples_per_s"] for row in rows[1:]])
        out[f"{name} cpu"] = C.median([len(x) / s for s in cpu])
    seconds = [row["seconds"] for row in rows[1:]]
    out["wait"] = C.median([w / s for w, s in zip(source.waits[1:], seconds)])
    out["first"] = C.median([w / s for w, s in zip(source.first[1:], seconds)])
    return out


class Loader:
    """A StoreSource feeding an in-process Engine of the network, no step run: each epoch's
    windows are bound and their ``x`` and ``y`` brought out, nothing else."""

    def __init__(self, cfg, url: str):
        from rapydli.scheduler.engine import Engine
        from rapydli.storage.loader import StoreSource

        net = cfg.network.build()
        self.engine = Engine(net, None, cfg.optimizer.build())
        self.engine.set_params(net.init(0))
        self.source, self.cfg, self.n_epochs, self.n_windows = StoreSource(url), cfg, 0, 0

    def rates(self) -> tuple[float, float]:
        """Records per wall second and per CPU-second of the next epoch."""
        self.n_epochs += 1
        clock, n, seen = Clock(), 0, set()
        train = self.cfg.train
        for name, _ in self.source.epoch(self.engine, self.n_epochs, train.batch_size, train.seed):
            if name not in seen:  # the window was just bound: bring its arrays out
                seen.add(name)
                n += len(self.engine.value(self.engine.data[(name, "x", 0)]))
                self.engine.value(self.engine.data[(name, "y", 0)])
        self.n_windows = len(seen)
        wall, cpu = clock.read()
        return n / wall, n / cpu


def compare(cfg, x, y, store_url: str, args, client=None, loader: Loader | None = None) -> dict:
    """Rounds of [a loader epoch,] fit on arrays, fit from the store: the medians of each rate
    and of the ratios taken within each round (``store/arrays``, ``loader/arrays``, and their
    ``cpu`` forms)."""
    rounds: list[dict[str, float]] = []
    if loader is not None:
        loader.rates()  # warm-up
    for _ in range(args.rounds):
        row = {}
        if loader is not None:
            row["loader"], row["loader cpu"] = loader.rates()
        row.update(fit_rates(cfg, x, y, store_url, args.epochs, client))
        for kind in ("", " cpu"):
            row[f"store/arrays{kind}"] = row[f"store{kind}"] / row[f"arrays{kind}"]
            if loader is not None:
                row[f"loader/arrays{kind}"] = row[f"loader{kind}"] / row[f"arrays{kind}"]
        rounds.append(row)
    return {key: C.median([r[key] for r in rounds]) for key in rounds[0]}


# --- output -------------------------------------------------------------------------------


def print_read_table(table: dict, args) -> None:
    png = table["images"]
    rows = [[LABELS[row], f"{t['n']:,}", f"{t['wall']:.3f}", f"{t['cpu']:.3f}",
             f"{t['n'] / t['wall']:,.0f}", f"{png['wall'] / t['wall']:.1f}x",
             f"{png['cpu'] / t['cpu']:.1f}x"] for row, t in table.items()]
    print(f"\nreading every record with load_shard(url, shard), shard after shard: {args.records:,}"
          f" records 1x{args.size}x{args.size} float32, medians of {args.rounds} rounds, files in "
          "the page cache")
    print(C.table(["back end", "records", "wall s", "CPU s", "records/s", "vs PNG files",
                   "vs PNG (CPU)"], rows))
    same = len({round(t["sum"], 2) for t in table.values()}) == 1 and \
        len({t["n"] for t in table.values()}) == 1
    print(f"every back end returned the same records (count, pixel sum): {'yes' if same else 'NO'}")
    print("(a folder source has one shard per 1,000 files, and load_shard lists the whole folder "
          "again for each shard; the last row lists it once)")
    lmdb = png["wall"] / table["lmdb"]["wall"]
    print(f"LMDB / individual PNG files: {lmdb:.1f}x (goal >= 3x): "
          f"{'met' if lmdb >= 3 else 'NOT met'}; by CPU time "
          f"{png['cpu'] / table['lmdb']['cpu']:.1f}x; against the folder listed once "
          f"{table['images-once']['wall'] / table['lmdb']['wall']:.1f}x")


def print_training(where: str, cfg, args, result: dict, extra: list, cpu: bool) -> None:
    print(f"\n{where}: digits CNN of examples/digits_cnn.yaml, batch {cfg.train.batch_size}, "
          f"{args.train_records:,} records 1x8x8 ({args.shards} LMDB shards); {args.rounds} "
          f"rounds of {args.epochs}-epoch fits, epochs 2.. (medians)")
    rows = [["fit on arrays", result["arrays"], result["arrays cpu"]],
            ["fit fed by StoreSource (LMDB)", result["store"], result["store cpu"]], *extra]
    rows = [[label, f"{wall:,.0f}", f"{per_cpu:,.0f}"] for label, wall, per_cpu in rows]
    headers = ["run", "samples/s", "per CPU-second"]
    print(C.table(headers if cpu else headers[:2], rows if cpu else [r[:2] for r in rows]))
    print(f"store-fed epochs: the training loop waited on the StoreSource {100 * result['wait']:.0f}"
          f"% of the time, {100 * result['first']:.0f}% before an epoch's first step")


def in_process(cfg, args, x, y, train_url: str, lmdb_url: str) -> float:
    """Sections 3 and 4 in-process; returns the loader's records/s."""
    loader = Loader(cfg, train_url)
    result = compare(cfg, x, y, train_url, args, loader=loader)
    extra = [(f"loader alone: StoreSource epochs ({loader.n_windows} windows), no steps",
              result["loader"], result["loader cpu"])]
    for label, url in (("the same records in HDF5", hdf5_copy(train_url, args.shards)),
                       (f"the 1x{args.size}x{args.size} LMDB store above", lmdb_url)):
        other = Loader(cfg, url)
        rates = [other.rates() for _ in range(args.rounds + 1)][1:]  # after a warm-up
        extra.append((f"loader alone, {label}", C.median([r[0] for r in rates]),
                      C.median([r[1] for r in rates])))
    print_training("in-process (sync scheduler, no client)", cfg, args, result, extra, cpu=True)
    ratio = result["loader/arrays"]
    print(f"loader / training: {ratio:.1f}x (goal >= 5x): {'met' if ratio >= 5 else 'NOT met'}; "
          f"by CPU time {result['loader/arrays cpu']:.1f}x")
    print(f"store-fed / in-memory training: {result['store/arrays']:.2f} (1.0 = loading fully "
          f"hidden); by CPU time {result['store/arrays cpu']:.2f}")
    serial = 1 / (1 + 1 / result["loader/arrays cpu"])
    print("  in-process nothing overlaps (shards are read in this thread, between steps): "
          f"expect 1 / (1 + training/loader) = {serial:.2f} (CPU rates)")
    return result["loader"]


def on_cluster(cfg, args, x, y, train_url: str, loader: float) -> None:
    client = C.cluster_client(1, 2)
    try:
        result = compare(cfg, x, y, train_url, args, client)
    finally:
        C.close_client(client)
    # (this process only submits there: its CPU time says nothing of the worker's)
    print_training("LocalCluster, 1 worker process x 2 threads", cfg, args, result, [], cpu=False)
    print(f"store-fed / in-memory training (LocalCluster): {result['store/arrays']:.2f} "
          "(1.0 = loading fully hidden; loading not overlapped, at the in-process loader rate: "
          f"{1 / (1 + result['arrays'] / loader):.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=8_000, help="records of the read table")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (medians)")
    parser.add_argument("--workdir", help="where data is written (default: a temporary dir)")
    parser.add_argument("--size", type=int, default=32, help="image side of the read table, a "
                        "multiple of 8")
    parser.add_argument("--shards", type=int, default=8, help="shards of each store")
    parser.add_argument("--train-records", type=int, default=4_000, help="8x8 records trained on")
    parser.add_argument("--epochs", type=int, default=2, help="epochs a fit, the first warm-up")
    parser.add_argument("--no-cluster", action="store_true", help="skip the LocalCluster runs")
    args = parser.parse_args()
    if args.epochs < 2 or args.size % 8 or min(args.rounds, args.records, args.shards) < 1:
        parser.error("expected --epochs >= 2 (the first is a warm-up), --size a multiple of 8 "
                     "and positive --rounds, --records, --shards")
    C.pin_threads(1)  # in-process work then runs on one core: CPU time measures it

    from rapydli.config import load_config

    print("command: python " + shlex.join(sys.argv))
    print(C.machine_line())
    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "examples", "digits_cnn.yaml"))
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        root = args.workdir or stack.enter_context(tempfile.TemporaryDirectory())
        os.makedirs(root, exist_ok=True)
        urls = build_sources(root, args.records, args.size, args.shards)
        x_u8, y = digits_u8(args.train_records, 8)
        x = to_float(x_u8)  # (n, 1, 8, 8): what the CNN takes
        train_url = training_store(root, x, y, args.shards)
        print(f"data written in {time.perf_counter() - start:.1f} s under {root}")
        print_read_table(read_table(urls, args.rounds), args)
        loader = in_process(cfg, args, x, y, train_url, urls["lmdb"])
        if not args.no_cluster:
            on_cluster(cfg, args, x, y, train_url, loader)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
