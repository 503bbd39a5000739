"""Tables 6–7 on this machine: seconds per epoch and peak memory of LoRA, AdaLoRA and Full (the LLM in the loop)
against SSNA (cached layers), on real Sci with all-MiniLM-L6-v2, every figure measured in the same script.

    .venv/bin/python benchmarks/bench_e2e.py [--max-steps 10] [--out benchmarks/results/e2e.json]

Each method runs in its own subprocess (``--child``), so its peak memory (process peak RSS on CPU, CUDA max
allocated on a GPU, as ``train.fit`` records it) is its own. The end-to-end baselines run a bounded epoch of
``--max-steps`` optimiser steps (batch 32 × accumulation 8 = 8 batches a step, the paper's settings), and their
seconds per epoch are extrapolated from the batches measured to the full epoch (said so in the table and the
JSON). SSNA runs whole epochs (measured). SSNA's stage-one store (MiniLM layers of every item, at the same
``--max-tokens`` the baselines use) is built first; its one-off time is reported beside the table.

The machine may be shared: the load average before and after is recorded with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.hardware import cpu_model  # noqa: E402

E2E = ("lora", "adalora", "full")
METHODS = (*E2E, "ssna")


def prepare(home: Path, shared: Path, max_tokens: int) -> dict[str, Any]:
    """The Sci dataset and SSNA's MiniLM store under HOME (cache hits when already there)."""
    os.environ["SSNAREC_HOME"] = str(home)
    from featurestore import embed_items
    from pipeline import datasets, workspace

    datasets.prepare("sci", from_dir=shared / "amazon-sci-unisrec")
    ds = datasets.load("sci")
    started = time.perf_counter()
    embed_items(workspace.store_dir(), "sci", ds.items["item_id"].to_list(), ds.items["text"].to_list(), "minilm",
                cache_dir=workspace.cache_dir(), max_length=max_tokens, device="cpu")
    return {"store_seconds": time.perf_counter() - started, "n_items": ds.n_items, "n_users": ds.n_users}


def child(method: str, args: argparse.Namespace) -> dict[str, Any]:
    """One method's run in this (fresh) process; returns fit's result row plus the process's baseline RSS."""
    import torch

    from featurestore import open_store
    from pipeline import datasets, workspace
    from train import ItemInputs, TrainConfig, fit, leave_one_out, resolve
    from train.loop import proc_status_mb

    torch.set_num_threads(args.threads)
    ds = datasets.load("sci")
    split = leave_one_out(ds.sequences, ds.n_items)
    if method == "ssna":
        store = open_store(workspace.store_dir(), "sci", "minilm")
        inputs = ItemInputs(ds.n_items, layers=store.top_layers)
        cfg = TrainConfig(method="ssna", dataset="sci", llm="minilm", max_epochs=args.ssna_epochs,
                          patience=args.ssna_epochs, threads=args.threads, autocast=args.autocast, device="cpu",
                          run_id=f"bench-ssna-{os.getpid()}")
    else:
        inputs = ItemInputs(ds.n_items, texts=ds.items["text"].to_list(), llm="minilm",
                            cache_dir=workspace.cache_dir())
        cfg = TrainConfig(method=method, dataset="sci", llm="minilm", max_steps=args.max_steps, max_epochs=1,
                          max_tokens=args.max_tokens, threads=args.threads, autocast=args.autocast,
                          grad_checkpointing=args.grad_checkpointing, device="cpu",
                          run_id=f"bench-{method}-{os.getpid()}")
    baseline = proc_status_mb("VmRSS")                       # imports, dataset and split; before fit
    started = time.perf_counter()
    result = fit(cfg, split, inputs, workspace.runs_dir(), progress=False)
    run_config = json.loads((result.run_dir / "config.json").read_text())
    return {**result.row, "baseline_rss_mb": baseline, "fit_wall_seconds": time.perf_counter() - started,
            "n_params": run_config["n_params"], "batches_measured": _batches(result.run_dir),
            "batches_per_epoch": -(-len(split.train) // resolve(cfg)[0].batch_size),
            "trainable_params": _trainable(cfg, inputs)}


def _trainable(cfg: Any, inputs: Any) -> int:
    """Trainable parameters of the method's model (built again, cheaply, after the run)."""
    import torch

    from train import resolve
    from train.loop import build_model

    model = build_model(resolve(cfg)[0], inputs, torch.device("cpu"))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _batches(run_dir: Path) -> int:
    import polars as pl

    return int(pl.read_parquet(run_dir / "epochs.parquet")["batches"].sum())


def run_child(method: str, args: argparse.Namespace, home: Path) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
        out = Path(tmp.name)
    cmd = [sys.executable, __file__, "--child", method, "--child-out", str(out), "--home", str(home),
           "--max-steps", str(args.max_steps), "--max-tokens", str(args.max_tokens), "--threads", str(args.threads),
           "--ssna-epochs", str(args.ssna_epochs), "--autocast", args.autocast]
    if args.grad_checkpointing:
        cmd.append("--grad-checkpointing")
    started = time.perf_counter()
    proc = subprocess.run(cmd, env={**os.environ, "SSNAREC_HOME": str(home)})
    if proc.returncode != 0:
        raise SystemExit(f"{method}: the child run failed (exit {proc.returncode}); its output is above")
    row = json.loads(out.read_text())
    out.unlink()
    row["process_seconds"] = time.perf_counter() - started
    return row


def table(rows: dict[str, dict[str, Any]], hardware: dict[str, Any]) -> str:
    ssna = rows.get("ssna")
    lines = [f"Sci, all-MiniLM-L6-v2, {hardware['cpu']} ({hardware['cpus']} CPUs, {hardware['threads']} torch "
             f"threads), load average {hardware['load_before']} before / {hardware['load_after']} after", "",
             "| method | s / epoch | measured | peak RSS MiB | above baseline MiB | SSNA speed-up | SSNA memory |",
             "|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        how = (f"extrapolated from {row['batches_measured']} of {row['batches_per_epoch']} batches"
               if row["seconds_extrapolated"] else f"{row['epochs']} full epoch(s)")
        speed = mem = ""
        if ssna is not None and name != "ssna":
            speed = f"{row['seconds_per_epoch'] / ssna['seconds_per_epoch']:.1f}×"
            mem = f"{100 * ssna['peak_memory_mb'] / row['peak_memory_mb']:.1f} %"
        lines.append(f"| {name} | {row['seconds_per_epoch']:.1f} | {how} | {row['peak_memory_mb']:.0f} | "
                     f"{row['peak_memory_mb'] - row['baseline_rss_mb']:.0f} | {speed} | {mem} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shared = Path(os.environ.get("SSNAREC_SHARED_DATA", REPO.parent / "shared" / "data"))
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated (default: %(default)s)")
    parser.add_argument("--max-steps", type=int, default=2,
                        help="optimiser steps of each bounded end-to-end run (8 batches of 32 each; default: %(default)s)")
    parser.add_argument("--ssna-epochs", type=int, default=2, help="whole SSNA epochs (default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=64, help="item text tokens (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1),
                        help="torch threads (default: %(default)s)")
    parser.add_argument("--autocast", default="off", help="off | bf16 (default: %(default)s)")
    parser.add_argument("--grad-checkpointing", action="store_true", help="end-to-end runs recompute activations")
    parser.add_argument("--shared", type=Path, default=shared, help="real data folder (default: %(default)s)")
    parser.add_argument("--home", type=Path, default=None,
                        help="SSNAREC_HOME for data, store and runs (default: $SSNAREC_HOME, else a temp folder)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "e2e.json",
                        help="JSON results (default: %(default)s)")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        os.environ["SSNAREC_HOME"] = str(args.home)
        row = child(args.child, args)
        args.child_out.write_text(json.dumps(row, default=str))
        return

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    home = args.home or (Path(os.environ["SSNAREC_HOME"]) if os.environ.get("SSNAREC_HOME")
                         else Path(tempfile.mkdtemp(prefix="bench-e2e-")))
    import torch

    hardware = {"cpu": cpu_model(), "cpus": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
                "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                "load_before": " ".join(f"{x:.1f}" for x in os.getloadavg())}
    setup = prepare(home, args.shared, args.max_tokens)
    rows: dict[str, dict[str, Any]] = {}
    for method in methods:
        print(f"--- {method}", file=sys.stderr, flush=True)
        rows[method] = run_child(method, args, home)
        hardware["load_after"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
        write_json(args.out, {"hardware": hardware, "setup": setup, "settings": vars(args) | {"home": str(home)},
                              "runs": rows})                 # after each method: a failure keeps the others
    print(table(rows, hardware))


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
