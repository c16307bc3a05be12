"""rapydli vs PyTorch (CPU) training throughput on one worker, same process, same thread count.

For each model (MLP 784-1024-1024-10, LeNet-5 on 1x28x28, autoencoder 196-1024-196 with
sigmoid units and mse loss) on synthetic float32 data, batch 256, SGD(lr=0.01, momentum=0.9):
rounds alternate rapydli (in-process Engine: the step's Dask task graph run by dask's
synchronous scheduler; with --cluster also a LocalCluster of 1 worker process with T threads,
steps grouped into tasks as ``fit`` groups them by default, ``steps_per_task="auto"``)
and the equivalent torch ``nn.Sequential`` (``torch.optim.SGD``, ``F.cross_entropy`` /
``F.mse_loss``), k steps each, after one warm-up round. Prints median samples/s and the ratio
rapydli / PyTorch per model, then the GFLOP/s of ``rapydli.kernels.dense_forward`` /
``dense_backward`` at the MLP's shapes against plain NumPy matmuls of the same sizes.

Goals: samples/s ratio rapydli / PyTorch >= 1.0 for every model; dense kernels >= 80% of the
NumPy matmul rate. Last, the peak memory of training steps per framework (each in a fresh
process, above what data and parameters hold).

    python benchmarks/compare_torch.py [--threads 2] [--rounds 5] [--steps 64] [--cluster]

The script re-executes itself with OMP/OPENBLAS/MKL/NUMBA_NUM_THREADS=T when they differ.
"""
from __future__ import annotations

import argparse

import _common as C

MODELS = ("mlp", "lenet", "autoencoder")


def torch_model(name):
    import torch.nn as nn

    if name == "mlp":
        return nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                             nn.Linear(1024, 10))
    if name == "lenet":
        return nn.Sequential(nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                             nn.Linear(256, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
                             nn.Linear(84, 10))
    return nn.Sequential(nn.Linear(196, 1024), nn.Sigmoid(), nn.Linear(1024, 196), nn.Sigmoid())


def rapydli_model(name):
    return {"mlp": C.mlp, "lenet": C.lenet, "autoencoder": C.autoencoder}[name]()


class TorchRunner:
    """k torch training steps on the same synthetic data and batch indices as rapydli."""

    def __init__(self, name, net, n_samples, lr, momentum):
        import torch
        import torch.nn.functional as F

        self.torch = torch
        x, y = C.synthetic(net, n_samples)
        self.x = torch.from_numpy(x)
        self.y = torch.from_numpy(y)
        self.model = torch_model(name)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=lr, momentum=momentum)
        self.loss = F.cross_entropy if net.loss.integer_labels else F.mse_loss

    def run(self, indices) -> float:
        import time

        start = time.perf_counter()
        for index in indices:
            index = self.torch.from_numpy(index)
            xb, yb = self.x[index], self.y[index]
            self.opt.zero_grad(set_to_none=True)
            loss = self.loss(self.model(xb), yb)
            loss.backward()
            self.opt.step()
            loss.item()  # like rapydli's metrics, the loss reaches the caller every step
        return time.perf_counter() - start


def compare(args, client):
    import torch

    from rapydli.trainer import TaskSize

    rows = []
    ratios = {}
    for name in args.models:
        net = rapydli_model(name)
        runners = {"rapydli in-process": C.make_engine(net, n_samples=args.samples)}
        if client is not None:
            runners["rapydli LocalCluster 1 worker"] = C.make_engine(net, client=client,
                                                                      n_samples=args.samples)
        # steps per task as fit sizes them by default ("auto": one step in-process, as many
        # as fill TASK_SECONDS on a cluster), kept from round to round as fit keeps them
        sizes = {key: TaskSize("auto", distributed=engine.client is not None)
                 for key, engine in runners.items()}
        peer = TorchRunner(name, net, args.samples, 0.01, 0.9)
        times = {key: [] for key in (*runners, "pytorch")}
        for r in range(args.rounds + 1):  # round 0 is the warm-up
            indices = C.batches(args.samples, args.batch, args.steps, start=r * args.steps)
            for key, engine in runners.items():
                seconds = C.run_steps(engine, indices, steps_per_task=sizes[key])
                if r:
                    times[key].append(seconds)
            seconds = peer.run(indices)
            if r:
                times["pytorch"].append(seconds)
        rate = {k: args.steps * args.batch / C.median(ts) for k, ts in times.items()}
        for key in runners:
            ratios[(name, key)] = rate[key] / rate["pytorch"]
            k = sizes[key].steps
            rows.append([name, key, f"{runners[key].plan(args.batch, 'train', k).n_tasks / k:.2f}"
                         f" ({k})",
                         f"{rate[key]:,.0f}", f"{rate['pytorch']:,.0f}",
                         f"{ratios[(name, key)]:.2f}"])
        for engine in runners.values():
            engine.close()
    print(f"\ntraining throughput, batch {args.batch}, {args.rounds} rounds x {args.steps} "
          f"steps (medians), torch threads {torch.get_num_threads()}")
    print(C.table(["model", "rapydli run", "tasks/step", "rapydli samples/s",
                   "pytorch samples/s", "ratio rapydli/pytorch"], rows,
                  ["<", "<", ">", ">", ">", ">"]))
    print(C.goal_line("ratio >= 1.0 for every model",
                      all(v >= 1.0 for v in ratios.values())))
    return ratios


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def _peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def memory_child(name: str, who: str, args) -> None:
    """In a fresh process: peak resident memory of training steps above the memory held
    after setup (data, parameters, and one step on 2 samples, which loads the code and
    compiled kernels), printed as one number in MiB."""
    net = rapydli_model(name)
    indices = C.batches(args.samples, args.batch, args.steps)
    tiny = [index[:2] for index in indices[:1]]  # loads code and kernels, allocates ~nothing
    if who == "rapydli":
        engine = C.make_engine(net, n_samples=args.samples)
        C.run_steps(engine, tiny)
        run = lambda: C.run_steps(engine, indices)  # noqa: E731
    else:
        peer = TorchRunner(name, net, args.samples, 0.01, 0.9)
        peer.run(tiny)
        run = lambda: peer.run(indices)  # noqa: E731
    with open("/proc/self/clear_refs", "w") as f:  # Linux: restart the peak (VmHWM) count here
        f.write("5")
    base = _rss_mib()
    run()
    print(f"{_peak_rss_mib() - base:.1f}")


def memory(args) -> None:
    """Peak memory per step of each framework, each measured in a process of its own."""
    import subprocess
    import sys

    rows = []
    for name in args.models:
        mib = {}
        for who in ("rapydli", "pytorch"):
            out = subprocess.run([sys.executable, __file__, "--memory-child", name, who,
                                  "--samples", str(args.samples), "--batch", str(args.batch),
                                  "--steps", str(args.steps)],
                                 capture_output=True, text=True, check=True).stdout
            mib[who] = float(out.strip().splitlines()[-1])
        rows.append([name, f"{mib['rapydli']:.1f}", f"{mib['pytorch']:.1f}"])
    print(f"\npeak resident memory of {args.steps} training steps above the memory held after "
          f"setup (data, parameters), batch {args.batch} (MiB; a fresh process each)")
    print(C.table(["model", "rapydli", "pytorch"], rows, ["<", ">", ">"]))


def dense_rates(args):
    """GFLOP/s of rapydli's dense kernels vs NumPy matmuls of the same sizes, MLP shapes."""
    import time

    import numpy as np

    from rapydli.kernels import dense_backward, dense_forward

    rng = np.random.default_rng(0)
    n = args.batch
    layers = [(784, 1024, False), (1024, 1024, True), (1024, 10, True)]  # (in, out, need_dx)
    cases = []  # (label, flops, kernel call, equivalent numpy matmuls)
    for i, o, need_dx in layers:
        x = rng.random((n, i), dtype=np.float32)
        w = rng.random((o, i), dtype=np.float32)
        b = rng.random(o, dtype=np.float32)
        dy = rng.random((n, o), dtype=np.float32)
        a_nk, b_ko = np.ascontiguousarray(x), np.ascontiguousarray(w.T)
        a_no, b_oi = np.ascontiguousarray(dy), np.ascontiguousarray(w)
        a_on = np.ascontiguousarray(dy.T)
        f = 2 * n * i * o
        cases.append((f"forward {n}x{i} @ {i}x{o}", f,
                      lambda x=x, w=w, b=b: dense_forward(x, w, b),
                      lambda a=a_nk, c=b_ko: a @ c))
        cases.append((f"backward {n}x{i}x{o}{'' if need_dx else ' (no dx)'}",
                      f * (2 if need_dx else 1),
                      lambda x=x, w=w, dy=dy, d=need_dx: dense_backward(x, w, dy, need_dx=d),
                      (lambda a=a_no, c=b_oi, e=a_on, x=x: (a @ c, e @ x)) if need_dx else
                      (lambda e=a_on, x=x: e @ x)))

    def timed(fn, reps):
        fn()
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - start) / reps

    kernel_t = {c[0]: [] for c in cases}
    numpy_t = {c[0]: [] for c in cases}
    for _ in range(args.kernel_rounds):  # alternate, so machine noise hits both alike
        for label, _, kernel, ref in cases:
            kernel_t[label].append(timed(kernel, args.kernel_reps))
            numpy_t[label].append(timed(ref, args.kernel_reps))
    rows = []
    tot_f = tot_k = tot_n = 0.0
    for label, f, *_ in cases:
        tk, tn = C.median(kernel_t[label]), C.median(numpy_t[label])
        tot_f, tot_k, tot_n = tot_f + f, tot_k + tk, tot_n + tn
        rows.append([label, f"{f / 1e6:.0f}", f"{tk * 1e3:.2f}", f"{f / tk / 1e9:.1f}",
                     f"{f / tn / 1e9:.1f}", f"{tn / tk:.0%}"])
    rows.append(["all (one MLP step's dense work)", f"{tot_f / 1e6:.0f}", f"{tot_k * 1e3:.2f}",
                 f"{tot_f / tot_k / 1e9:.1f}", f"{tot_f / tot_n / 1e9:.1f}",
                 f"{tot_n / tot_k:.0%}"])
    print(f"\nMLP dense kernels, batch {n}, float32 ({args.kernel_rounds} rounds x "
          f"{args.kernel_reps} calls, medians)")
    print(C.table(["kernel", "MFLOP", "ms", "rapydli GFLOP/s", "NumPy matmul GFLOP/s",
                   "of NumPy"], rows))
    print(C.goal_line("dense kernels >= 80% of the NumPy matmul rate", tot_n / tot_k >= 0.8))
    return tot_f / tot_k, tot_f / tot_n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="T: torch and BLAS threads")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (after 1 warm-up)")
    parser.add_argument("--steps", type=int, default=64, help="k: steps per run per round")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--samples", type=int, default=2048, help="synthetic dataset size")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--cluster", action="store_true",
                        help="also run rapydli on a LocalCluster of 1 worker process, T threads")
    parser.add_argument("--kernel-rounds", type=int, default=5)
    parser.add_argument("--kernel-reps", type=int, default=10)
    parser.add_argument("--memory-child", nargs=2, metavar=("MODEL", "WHO"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    C.pin_threads(args.threads)

    import torch

    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(*args.memory_child, args)
        return
    print(C.machine_line())
    client = None
    if args.cluster:
        client = C.cluster_client(1, args.threads)
        print(f"LocalCluster worker thread pools: {C.worker_blas_threads(client)}")
    try:
        compare(args, client)
    finally:
        if client is not None:
            C.close_client(client)
    dense_rates(args)
    memory(args)


if __name__ == "__main__":
    main()
