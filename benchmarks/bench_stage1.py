"""Stage-one speed on Sci with all-MiniLM-L6-v2, every figure measured in the same run (the machine is shared).

    .venv/bin/python benchmarks/bench_stage1.py [--limit N] [--out benchmarks/results/stage1.json]

Measures items/s of ``embed_items`` (end to end: model load, tokenisation, sorting, forward, fp16 cast, shard
writes and hashes) against (a) a MoRec-style loop (batches of 32 in catalogue order, padded to max_length,
fp32, tokenised per batch) and (b) a bare forward over pre-tokenised length-sorted batches in the same
precision as ours (forward only); also a bare fp32 forward (is bf16 worth it here?), the per-layer [CLS]
cosine of the stored fp16 values against fp32, the truncated fraction, the store size and the cache-hit time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.hardware import cpu_model  # noqa: E402
from featurestore import embed_items, load_llm  # noqa: E402
from featurestore.embed import LayerEmbedder, bf16_supported, token_budget_batches  # noqa: E402


def sci_texts(folder: Path, limit: int | None) -> tuple[list[str], list[str]]:
    """Sci item ids and texts in Scientific.item2index order."""
    texts = dict(line.rstrip("\n").split("\t", 1) for line in
                 (folder / "Scientific.text").read_text().splitlines()[1:])
    order = sorted((int(idx), item) for item, idx in
                   (line.split("\t") for line in (folder / "Scientific.item2index").read_text().splitlines()))
    ids = [item for _, item in order][:limit]
    return ids, [texts[item] for item in ids]


class Clock:
    """Wall and process-CPU seconds of a block (CPU time is less sensitive to other users of a shared machine)."""

    def __enter__(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def morec_loop(model, tokenizer, texts: list[str], max_length: int, batch: int = 32) -> tuple[Clock, np.ndarray]:
    """(a) batches of 32 in catalogue order, padded to max_length, fp32, tokenised per batch."""
    out = []
    with Clock() as clock, torch.inference_mode():
        for i in tqdm(range(0, len(texts), batch), desc="(a) MoRec-style loop", unit="batch", leave=False):
            enc = tokenizer(texts[i:i + batch], padding="max_length", truncation=True, max_length=max_length,
                            return_tensors="pt")
            states = model(**enc, output_hidden_states=True).hidden_states
            out.append(torch.stack([h[:, 0] for h in reversed(states)], dim=1).numpy())
    return clock, np.concatenate(out)


def bare_forward(embedder: LayerEmbedder, texts: list[str], batch_tokens: int, precision: str, desc: str) -> Clock:
    """(b) forward only, over pre-tokenised length-sorted token-budget batches (tensors built beforehand)."""
    ids, _ = embedder.tokenize(texts)
    lengths = np.array([len(x) for x in ids])
    batches = [embedder._tensors([ids[i] for i in b]) for b in token_budget_batches(lengths, batch_tokens)]
    with Clock() as clock:
        for input_ids, mask in tqdm(batches, desc=desc, unit="batch", leave=False):
            embedder.forward(input_ids, mask, precision)
    return clock


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shared = Path(os.environ.get("SSNAREC_SHARED_DATA", REPO.parent / "shared" / "data"))
    parser.add_argument("--data", type=Path, default=shared / "amazon-sci-unisrec", help="UniSRec Sci folder")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "stage1.json",
                        help="JSON result path")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="wheel/model cache (default $SSNAREC_HOME/cache, or ./workspace/cache)")
    parser.add_argument("--max-length", type=int, default=64, help="tokens per text")
    parser.add_argument("--batch-tokens", type=int, default=8192, help="token budget per batch (ours and (b))")
    parser.add_argument("--limit", type=int, default=None, help="only the first N items (quick run)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="rounds of all methods (order reversed every other round); the best time counts")
    args = parser.parse_args()

    cache_dir = args.cache_dir or Path(os.environ.get("SSNAREC_HOME", REPO / "workspace")) / "cache"
    ids, texts = sci_texts(args.data, args.limit)
    n = len(texts)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    precision = "bf16" if bf16_supported(device) else "fp32"
    load_before = os.getloadavg()
    model, tokenizer, _ = load_llm("minilm", cache_dir, device)
    embedder = LayerEmbedder(model, tokenizer, max_length=args.max_length, device=device, precision=precision)
    samples: dict[str, list[dict[str, float]]] = {"ours": [], "bare": [], "bare_fp32": [], "morec": []}
    info: dict = {}

    def ours() -> Clock:
        with tempfile.TemporaryDirectory(prefix="bench-stage1-") as tmp:
            with Clock() as clock:
                store = embed_items(Path(tmp), "sci", ids, texts, "minilm", cache_dir=cache_dir,
                                    max_length=args.max_length, batch_tokens=args.batch_tokens, device=device,
                                    progress=True)
            if not info:
                info["stored"] = np.array(store.top_layers(store.n_layers), dtype=np.float32)
                info["run"] = dict(store.run_stats or {})
                started = time.perf_counter()
                hit = embed_items(Path(tmp), "sci", ids, texts, "minilm", cache_dir=cache_dir,
                                  max_length=args.max_length, batch_tokens=args.batch_tokens, device=device,
                                  progress=False)
                info["cache_hit_s"] = time.perf_counter() - started
                assert hit.run_stats["cache_hit"]
                info["shape"], info["bytes"] = [store.n_items, store.n_layers, store.hidden], store.nbytes
                info["truncated"] = store.manifest["truncated_fraction"]
                del hit
            del store
        return clock

    def morec() -> Clock:
        clock, reference = morec_loop(model, tokenizer, texts, args.max_length)
        info.setdefault("reference", reference)
        return clock

    methods = {
        "ours": ours,
        "bare": lambda: bare_forward(embedder, texts, args.batch_tokens, precision, f"(b) bare {precision}"),
        "bare_fp32": lambda: bare_forward(embedder, texts, args.batch_tokens, "fp32", "bare fp32"),
        "morec": morec,
    }
    for round_ in range(args.repeats):
        for name in (list(methods) if round_ % 2 == 0 else list(methods)[::-1]):
            clock = methods[name]()
            samples[name].append({"wall_s": clock.wall, "cpu_s": clock.cpu})
    load_after = os.getloadavg()
    wall = {k: min(s["wall_s"] for s in v) for k, v in samples.items()}
    cpu = {k: min(s["cpu_s"] for s in v) for k, v in samples.items()}
    stored, reference = info["stored"], info["reference"]
    cosine = (stored * reference).sum(-1) / (np.linalg.norm(stored, axis=-1) * np.linalg.norm(reference, axis=-1))

    result = {
        "dataset": "sci", "llm": "minilm", "items": n, "max_length": args.max_length,
        "batch_tokens": args.batch_tokens, "precision": info["run"].get("precision_used", precision),
        "repeats": args.repeats,
        "stage1_items_per_s": n / wall["ours"],
        "morec_loop_items_per_s": n / wall["morec"],
        "bare_forward_items_per_s": n / wall["bare"],
        "bare_fp32_forward_items_per_s": n / wall["bare_fp32"],
        "stage1_speedup_vs_morec_loop": wall["morec"] / wall["ours"],
        "stage1_fraction_of_bare_forward": wall["bare"] / wall["ours"],
        "bf16_speedup_bare_forward": wall["bare_fp32"] / wall["bare"],
        "cpu_time_ratios": {"speedup_vs_morec_loop": cpu["morec"] / cpu["ours"],
                            "fraction_of_bare_forward": cpu["bare"] / cpu["ours"],
                            "bf16_speedup_bare_forward": cpu["bare_fp32"] / cpu["bare"]},
        "samples": samples,
        "embed_seconds": wall["ours"], "cache_hit_seconds": info["cache_hit_s"],
        "store_shape": info["shape"], "store_bytes": info["bytes"], "truncated_fraction": info["truncated"],
        "min_cosine_stored_vs_fp32_per_layer": cosine.min(axis=0).round(6).tolist(),
        "run": info["run"],
        "hardware": {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                     "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                     "torch": torch.__version__, "bf16_supported": bf16_supported(device),
                     "loadavg_before": load_before, "loadavg_after": load_after},
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp_out, args.out)

    ratio = result["cpu_time_ratios"]
    print(f"hardware: {result['hardware']['cpu']}, {os.cpu_count()} cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), GPU {result['hardware']['gpu']}, precision {result['precision']}, "
          f"load average {load_before[0]:.1f} → {load_after[0]:.1f}; best of {args.repeats}")
    print(f"Sci, {n} items, max_length {args.max_length} ({info['truncated']:.1%} truncated), store "
          f"{info['shape']} {info['bytes'] / 2**20:.1f} MiB")
    print(f"ours (embed_items, end to end) {n / wall['ours']:8.1f} items/s  ({wall['ours']:.1f} s)")
    print(f"(a) MoRec-style loop           {n / wall['morec']:8.1f} items/s  → ours is "
          f"{wall['morec'] / wall['ours']:.2f}× (CPU time {ratio['speedup_vs_morec_loop']:.2f}×; target ≥ 3×)")
    print(f"(b) bare {precision} forward         {n / wall['bare']:8.1f} items/s  → ours is "
          f"{wall['bare'] / wall['ours']:.0%} (CPU time {ratio['fraction_of_bare_forward']:.0%}; target ≥ 85%)")
    print(f"bare fp32 forward              {n / wall['bare_fp32']:8.1f} items/s  → bf16 speed-up "
          f"{wall['bare_fp32'] / wall['bare']:.2f}× (CPU time {ratio['bf16_speedup_bare_forward']:.2f}×)")
    print(f"cache hit {info['cache_hit_s']:.2f} s; min per-layer cosine stored vs fp32 {cosine.min():.5f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
