"""The README's main job, timed: ``rapydli train examples/digits_cnn.yaml`` (hybrid placement on
an embedded 2-worker LocalCluster). Prints wall time (cluster start included), final test
accuracy, and the same network trained in-process on one worker for comparison.

Goal (issue 2): at least 97% test accuracy in under 2 minutes on a 2-core machine.

    python benchmarks/main_job.py [--config examples/digits_cnn.yaml]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_cli(config: str, out: Path, extra: list[str]) -> tuple[float, dict]:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "rapydli.cli", "train", config, "--out", str(out),
                    "--no-progress", *extra], check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    return seconds, last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="examples/digits_cnn.yaml")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        hybrid_s, hybrid = run_cli(args.config, Path(tmp) / "hybrid", [])
        single_s, single = run_cli(args.config, Path(tmp) / "single", ["--mesh", "data=1,model=1"])
    print(f"{'run':<28}{'wall s':>8}{'test acc':>10}{'samples/s':>11}")
    print(f"{'hybrid, 2 worker processes':<28}{hybrid_s:>8.1f}{hybrid['test_accuracy']:>10.4f}"
          f"{hybrid['samples_per_s']:>11.0f}")
    print(f"{'hybrid mesh 1x1 (1 worker)':<28}{single_s:>8.1f}{single['test_accuracy']:>10.4f}"
          f"{single['samples_per_s']:>11.0f}")
    print(f"ratio 2-worker / 1-worker samples/s: "
          f"{hybrid['samples_per_s'] / single['samples_per_s']:.2f}")
    ok = hybrid["test_accuracy"] >= 0.97 and hybrid_s < 120
    print(f"goal (>= 97% test accuracy in < 120 s): {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
