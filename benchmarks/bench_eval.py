"""Benchmark: full ranking of every Sci test user (8442 users x 4385 items, d = 256) with random vectors.

Target (issue 4): <= 1 s on the project's 2-core CPU machine. Reports the median of several repeats of
``evaluate.metrics.full_ranking`` (RecBole convention, and MoRec's history exclusion with Sci-like
histories), next to a ``torch.topk``-based evaluator for reference, and writes JSON to --out.

    .venv/bin/python benchmarks/bench_eval.py [--repeats 5] [--threads 2] [--out benchmarks/results/eval.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.hardware import cpu_model  # noqa: E402
from evaluate.metrics import full_ranking  # noqa: E402
from evaluate.results import write_text_atomic  # noqa: E402

N_USERS, N_ITEMS, DIM = 8442, 4385, 256


def topk_reference(users: torch.Tensor, items: torch.Tensor, targets: torch.Tensor, batch_size: int = 4096) -> float:
    """A typical topk evaluator (top-50 per user, then look for the target); returns mean R@10 as a check."""
    hits = 0
    with torch.inference_mode():
        for start in range(0, users.shape[0], batch_size):
            top = torch.topk(users[start : start + batch_size] @ items.T, 50, dim=1).indices
            hits += int((top[:, :10] == targets[start : start + batch_size, None]).any(dim=1).sum())
    return hits / users.shape[0]


def timed(fn, repeats: int) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls after one warm-up call."""
    fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    """Run the benchmark and write its JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats after one warm-up (default 5)")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch threads (default: min(2, cores))")
    parser.add_argument("--batch-size", type=int, default=4096, help="users scored per batch (default 4096)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "eval.json",
                        help="JSON output (default benchmarks/results/eval.json)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    gen = torch.Generator().manual_seed(0)
    users = torch.nn.functional.normalize(torch.randn(N_USERS, DIM, generator=gen), dim=1)
    items = torch.nn.functional.normalize(torch.randn(N_ITEMS, DIM, generator=gen), dim=1)
    targets = torch.randint(0, N_ITEMS, (N_USERS,), generator=gen)
    rng = np.random.default_rng(0)
    histories = [rng.integers(0, N_ITEMS, size=rng.integers(2, 50)) for _ in range(N_USERS)]

    cases = {
        "full_ranking": lambda: full_ranking(users, items, targets, batch_size=args.batch_size),
        "full_ranking_exclude_history": lambda: full_ranking(
            users, items, targets, histories=histories, exclude_history=True, batch_size=args.batch_size),
        "topk50_reference": lambda: topk_reference(users, items, targets, args.batch_size),
    }
    seconds = {name: timed(fn, args.repeats) for name, fn in cases.items()}
    median = {name: statistics.median(s) for name, s in seconds.items()}
    result = {
        "benchmark": "full ranking of every Sci test user, random L2-normalised vectors",
        "users": N_USERS, "items": N_ITEMS, "dim": DIM, "batch_size": args.batch_size,
        "median_seconds": median, "all_seconds": seconds,
        "target_seconds": 1.0, "meets_target": median["full_ranking"] <= 1.0,
        "hardware": {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                     "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine()},
        "load_average_1_5_15min_at_end": list(os.getloadavg()),
    }
    for name, value in median.items():
        print(f"{name:32s} {value:.3f} s (median of {args.repeats})")
    print(f"hardware: {result['hardware']['cpu']}, {result['hardware']['torch_threads']} torch threads, "
          f"{result['hardware']['cores']} cores, torch {torch.__version__}; load average {os.getloadavg()[0]:.2f} "
          "(other processes share these cores: compare runs at similar load)")
    write_text_atomic(json.dumps(result, indent=2) + "\n", args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
