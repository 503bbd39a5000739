"""Every performance figure of the project, side by side, in one run (``make bench``, ``make bench-quick``).

    .venv/bin/python -m benchmarks.run [--quick] [--threads N] [--home DIR] [--only stage1,train,eval,scaling]

Writes ``benchmarks/results/latest.json`` and a dated copy ``benchmarks/results/<UTC date-time>.json`` (atomic
writes), then prints a table. Every ratio is measured in the same run as both of its sides; every entry holds
its absolute values, the ratio, how it was measured (whole or bounded and extrapolated, from how many steps)
and the hardware with the load average before and after. Keys, methods and targets: ``benchmarks/README.md``.
``python -m benchmarks.readme_section`` puts the figures into the README.

Groups (``--only``):
- ``stage1``: ``bench_stage1.py`` (embed_items vs a MoRec-style loop vs a bare forward, and the cache hit);
- ``train``: SSNA, TMoE and LoRA training on real Sci, each in its own process (so that its peak memory is its
  own), through ``train.fit``;
- ``eval``: ``bench_eval.py`` (full ranking of every Sci test user);
- ``scaling``: stage one and an SSNA epoch at growing synthetic catalogues (Sci texts and sequences
  replicated with distinct ids), with the log-log slope of time against size.

The training figures are training time and memory only: in the bench's child processes ``train.fit``'s
evaluation (which for LoRA encodes every item through the LLM) is replaced by a constant, so a bounded LoRA
run does not spend minutes on a validation pass whose result is not wanted here.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:   # `python benchmarks/run.py` as well as `python -m benchmarks.run`
    sys.path.insert(0, str(REPO))

from benchmarks.hardware import cpu_model  # noqa: E402
from pipeline.cli import ONEDNN_CACHE  # noqa: E402

SCHEMA_VERSION = 1
RESULTS_DIR = HERE / "results"
LATEST = "latest.json"
GROUPS = ("stage1", "train", "eval", "scaling")
SCI_ITEMS, SCI_USERS = 4385, 8442
MAX_TOKENS = 64          # tokens per item text, in stage one and in the LLM-in-the-loop baseline alike
SSNA_BATCH, SSNA_A = 256, 3
WARMUP_ITEMS = 16        # items of the untimed warm-up run (and of the fixed-cost run) before stage-one scaling


@dataclass(frozen=True)
class KeySpec:
    """What a stable key means: its unit, its target (operator and value) and the group that measures it."""

    unit: str                    # items/s | s | x (a ratio) | fraction | exponent
    target: tuple[str, float] | None
    group: str
    summary: str


KEYS: dict[str, KeySpec] = {
    "stage1_items_per_s": KeySpec("items/s", None, "stage1", "stage one (embed_items, end to end), Sci, minilm"),
    "stage1_speedup_vs_morec_loop": KeySpec("x", (">=", 3.0), "stage1", "stage one vs a MoRec-style loop"),
    "stage1_fraction_of_bare_forward": KeySpec("fraction", (">=", 0.85), "stage1",
                                               "stage one vs a bare forward over sorted batches"),
    "cache_hit_seconds": KeySpec("s", ("<=", 2.0), "stage1", "second embed on a cached store"),
    "ssna_epoch_seconds_sci": KeySpec("s", ("<=", 8.0), "train", "SSNA epoch, Sci, batch 256, a = 3, minilm"),
    "ssna_over_tmoe_epoch_ratio": KeySpec("x", ("<=", 1.5), "train", "SSNA epoch / TMoE epoch (same batch)"),
    "lora_over_ssna_epoch_ratio": KeySpec("x", (">=", 100.0), "train", "LoRA epoch / SSNA epoch"),
    "ssna_over_lora_peak_memory_ratio": KeySpec("fraction", ("<=", 0.05), "train",
                                                "SSNA peak training memory / LoRA's"),
    "ssna_over_lora_peak_memory_ratio_checkpointed": KeySpec("fraction", None, "train", "the same, both with "
                                                             "--grad-checkpointing"),
    "eval_seconds_sci_test": KeySpec("s", ("<=", 1.0), "eval", "full ranking of every Sci test user"),
    "stage1_scaling_exponent": KeySpec("exponent", ("<=", 1.2), "scaling",
                                       "stage-one time vs catalogue size (log-log slope)"),
    "ssna_epoch_scaling_exponent": KeySpec("exponent", ("<=", 1.2), "scaling",
                                           "SSNA epoch time vs catalogue and user count (log-log slope)"),
}
ENTRY_FIELDS = ("key", "value", "unit", "ratio", "values", "measured", "extrapolated", "bounded", "steps",
                "target", "meets_target", "hardware")


# --------------------------------------------------------------------------------------------- results file
def meets(value: float | None, target: tuple[str, float] | None) -> bool | None:
    """Whether VALUE meets TARGET (``(">=", 3.0)``); None when there is no target or no value."""
    if target is None or value is None or not np.isfinite(value):
        return None
    op, bound = target
    return bool(value >= bound) if op == ">=" else bool(value <= bound)


def make_entry(key: str, value: float, *, values: dict[str, Any], measured: str, hardware: dict[str, Any],
               ratio: float | None = None, extrapolated: bool = False, bounded: bool = False,
               steps: int | None = None) -> dict[str, Any]:
    """One result entry for stable KEY: the headline VALUE, the absolute VALUES behind it, the RATIO (for ratio
    keys the value itself), how it was MEASURED, whether it is EXTRAPOLATED or BOUNDED (and from how many
    STEPS), the target and whether it is met, and the HARDWARE (with the load average around it)."""
    spec = KEYS.get(key)
    if spec is None:
        raise KeyError(f"unknown benchmark key {key!r}; known: {', '.join(KEYS)}")
    value = float(value)
    if spec.unit in ("x", "fraction") and ratio is None:
        ratio = value
    return {"key": key, "value": value, "unit": spec.unit, "ratio": None if ratio is None else float(ratio),
            "values": values, "measured": measured, "extrapolated": bool(extrapolated), "bounded": bool(bounded),
            "steps": steps, "target": None if spec.target is None else {"op": spec.target[0],
                                                                        "value": spec.target[1]},
            "meets_target": meets(value, spec.target), "hardware": dict(hardware)}


def validate_results(payload: dict[str, Any]) -> None:
    """Raise ValueError naming every problem if PAYLOAD is not a well-formed results file (all keys present
    unless it says ``partial``)."""
    problems = [f"missing top-level field {name!r}" for name in
                ("schema_version", "mode", "partial", "measured_at", "hardware", "settings", "entries")
                if name not in payload]
    entries = payload.get("entries", {})
    if not payload.get("partial", False):
        problems += [f"missing entry {key!r}" for key in KEYS if key not in entries]
    for key, entry in entries.items():
        if key not in KEYS:
            problems.append(f"unknown entry {key!r}")
            continue
        problems += [f"{key}: missing field {name!r}" for name in ENTRY_FIELDS if name not in entry]
        if entry.get("key") != key:
            problems.append(f"{key}: its 'key' field says {entry.get('key')!r}")
        if not isinstance(entry.get("value"), (int, float)):
            problems.append(f"{key}: value {entry.get('value')!r} is not a number")
        if entry.get("extrapolated") and not entry.get("steps"):
            problems.append(f"{key}: extrapolated without the number of steps it was extrapolated from")
        for name in ("cpu", "cores", "torch_threads", "torch", "gpu", "loadavg_before", "loadavg_after"):
            if name not in entry.get("hardware", {}):
                problems.append(f"{key}: hardware block lacks {name!r}")
    if problems:
        raise ValueError("malformed benchmark results: " + "; ".join(problems))


def utc_stamp(seconds: float | None = None) -> str:
    """``2026-11-28T08-35-07Z`` (a file-name-safe UTC date-time)."""
    return time.strftime("%Y-%m-%dT%H-%M-%SZ", time.gmtime(seconds))


def write_results(payload: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """Validate PAYLOAD, then write it atomically as OUT_DIR/<UTC date-time>.json and OUT_DIR/latest.json."""
    from evaluate.results import write_text_atomic

    validate_results(payload)
    text = json.dumps(payload, indent=1, default=str) + "\n"
    dated = Path(out_dir) / f"{utc_stamp(payload.get('finished_unix'))}.json"
    write_text_atomic(text, dated)
    latest = Path(out_dir) / LATEST
    write_text_atomic(text, latest)
    return latest, dated


def read_results(path: Path) -> dict[str, Any]:
    """A results file, validated; the error names the file and the fix."""
    try:
        payload = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no benchmark results. Fix: run `make bench` (or `make bench-quick`)."
                                ) from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}, line {exc.lineno}: not valid JSON ({exc.msg}). Fix: run `make bench` again."
                         ) from None
    try:
        validate_results(payload)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}. Fix: run `make bench` again.") from None
    return payload


# ------------------------------------------------------------------------------------------ formatting
def format_value(entry: dict[str, Any]) -> str:
    """The headline value in its unit: ``71.8 items/s``, ``0.61 s``, ``3.35×``, ``103%``, ``1.02``."""
    value, unit = entry["value"], entry["unit"]
    if not np.isfinite(value):
        return "n/a"
    if unit == "x":
        return f"{value:.1f}×" if value >= 10 else f"{value:.2f}×"
    if unit == "fraction":
        return f"{100 * value:.1f}%" if value < 0.1 else f"{100 * value:.0f}%"
    if unit == "s":
        return f"{value:.0f} s" if value >= 100 else f"{value:.3g} s"
    if unit == "items/s":
        return f"{value:.1f} items/s"
    return f"{value:.2f}"


def format_target(entry: dict[str, Any]) -> str:
    """``≥ 3×``, ``≤ 1 s``, ``≤ 5%``, or ``—`` without a target."""
    target = entry.get("target")
    if not target:
        return "—"
    sign = "≥" if target["op"] == ">=" else "≤"
    bound = target["value"]
    text = format_value({"value": bound, "unit": entry["unit"]})
    if entry["unit"] == "exponent":
        text = f"{bound:g}"
    elif entry["unit"] == "s":
        text = f"{bound:g} s"
    elif entry["unit"] == "x":
        text = f"{bound:g}×"
    elif entry["unit"] == "fraction":
        text = f"{100 * bound:g}%"
    return f"{sign} {text}"


def format_met(entry: dict[str, Any]) -> str:
    return {True: "yes", False: "no", None: ""}[entry.get("meets_target")]


def format_how(entry: dict[str, Any]) -> str:
    """How the figure was measured, with the extrapolation flag spelled out."""
    how = entry["measured"]
    if entry.get("extrapolated"):
        how += f" [extrapolated from {plural(entry['steps'], 'step')}]"
    return how


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def format_table(payload: dict[str, Any]) -> str:
    """The results as an aligned plain-text table, with the hardware line above it."""
    hw = payload["hardware"]
    rows = [("key", "value", "target", "met", "how")]
    rows += [(key, format_value(e), format_target(e), format_met(e), format_how(e))
             for key, e in payload["entries"].items()]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [f"{payload['mode']} run, {payload['measured_at']}: {hw['cpu']}, {hw['cores']} cores, "
             f"{hw['torch_threads']} torch threads, GPU {gpu_name(hw)}, torch {hw['torch']}, load average "
             f"{hw['loadavg_before'][0]:.1f} → {hw['loadavg_after'][0]:.1f}, {payload['wall_seconds']:.0f} s"]
    for i, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths, strict=True)) + "  " + row[4])
        if i == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 3)
    return "\n".join(lines)


def gpu_name(hardware: dict[str, Any]) -> str:
    gpu = hardware.get("gpu")
    return "none" if not gpu else f"{gpu['name']} ×{gpu['count']}"


# -------------------------------------------------------------------------------------------- measuring
def scaling_exponent(sizes: Sequence[float], seconds: Sequence[float]) -> float:
    """The slope of log(seconds) against log(sizes) (least squares): 1 for linear growth, 2 for quadratic."""
    x, y = np.asarray(sizes, dtype=float), np.asarray(seconds, dtype=float)
    if x.shape != y.shape or len(x) < 2 or len(np.unique(x)) < 2 or not np.all(x > 0):
        raise ValueError(f"need at least two distinct positive sizes with one time each; got sizes {list(sizes)} "
                         f"and seconds {list(seconds)}")
    if not np.all(np.isfinite(y) & (y > 0)):
        raise ValueError(f"times must be positive and finite; got {list(seconds)}")
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


def synthetic_sequences(sequences: Sequence[np.ndarray], n_items: int, scale: int,
                        users: int | None = None) -> tuple[list[np.ndarray], np.ndarray]:
    """A synthetic catalogue SCALE times the base: the first USERS sequences (all when None) re-indexed onto
    the m items they touch (all N_ITEMS when USERS is None), replicated SCALE times with distinct ids (copy c
    of base item i is c·m + i). Returns the sequences and, per synthetic item, the real item_idx it copies."""
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    base = list(sequences[:users]) if users else list(sequences)
    used = np.unique(np.concatenate(base)) if users else np.arange(n_items)
    local = [np.searchsorted(used, np.asarray(s)) for s in base]
    m = len(used)
    return [s + c * m for c in range(scale) for s in local], np.tile(used, scale)


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def hardware_base(threads: int, device: str) -> dict[str, Any]:
    """CPU model, cores, torch threads, GPU (name, count, CUDA version, memory), torch and Python versions."""
    import torch

    from featurestore.embed import bf16_supported

    gpu = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = {"name": props.name, "count": torch.cuda.device_count(), "cuda": torch.version.cuda,
               "memory_gib": round(props.total_memory / 2**30, 1)}
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": threads,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "gpu": gpu, "device": device,
            "torch": torch.__version__, "python": platform.python_version(),
            "bf16_supported": bf16_supported(device)}


@contextlib.contextmanager
def load_window(base: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The hardware block for a measurement: BASE plus the load average before and after it."""
    block = {**base, "loadavg_before": loadavg()}
    yield block
    block["loadavg_after"] = loadavg()


class CudaClock:
    """CUDA event time and max allocated memory of a block, on a CUDA device; empty (``result() is None``)
    elsewhere."""

    def __init__(self, device: str):
        import torch

        self.torch = torch
        self.on = str(device).startswith("cuda") and torch.cuda.is_available()
        self.ms: float | None = None
        self.max_allocated_mb: float | None = None

    def __enter__(self) -> CudaClock:
        if self.on:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
            self.start = self.torch.cuda.Event(enable_timing=True)
            self.start.record()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.on:
            end = self.torch.cuda.Event(enable_timing=True)
            end.record()
            end.synchronize()
            self.ms = float(self.start.elapsed_time(end))
            self.max_allocated_mb = self.torch.cuda.max_memory_allocated() / 2**20

    def result(self) -> dict[str, float] | None:
        if self.ms is None:
            return None
        return {"event_seconds": self.ms / 1000, "max_memory_allocated_mb": self.max_allocated_mb}


@dataclass(frozen=True)
class Plan:
    """How much each group measures (quick and full defaults below; options override)."""

    stage1_limit: int | None          # Sci items in the stage-one comparison (None: all 4385)
    stage1_repeats: int               # rounds of bench_stage1 (the best counts)
    eval_repeats: int                 # timed repeats of bench_eval (the median counts)
    train_steps: int | None           # optimiser steps of the SSNA/TMoE runs (None: whole epochs)
    train_epochs: int                 # epochs of the SSNA/TMoE runs when whole (the median counts)
    lora_steps: int                   # LoRA optimiser steps (8 batches of 32 each); its epoch is extrapolated
    memory_steps: int                 # SSNA optimiser steps of the profiled tensor-memory run (CPU only)
    memory_lora_steps: int            # LoRA optimiser steps of the profiled tensor-memory run (CPU only)
    scales: tuple[int, ...]           # catalogue multiples of the scaling runs
    scale_items: int | None           # stage-one scaling base: first N Sci items (None: all)
    scale_users: int | None           # SSNA scaling base: first N Sci users and the items they touch (None: all)


QUICK = Plan(stage1_limit=384, stage1_repeats=1, eval_repeats=3, train_steps=8, train_epochs=1, lora_steps=1,
             memory_steps=8, memory_lora_steps=1, scales=(1, 2, 4), scale_items=256, scale_users=256)
FULL = Plan(stage1_limit=None, stage1_repeats=2, eval_repeats=5, train_steps=None, train_epochs=2, lora_steps=10,
            memory_steps=30, memory_lora_steps=3, scales=(1, 4, 16), scale_items=None, scale_users=None)


@dataclass
class Context:
    """One bench run: its plan, folders, threads and device, and the hardware block."""

    plan: Plan
    home: Path
    cache_dir: Path
    sci: Path
    scratch: Path
    threads: int
    device: str
    autocast: str
    hardware: dict[str, Any] = field(default_factory=dict)
    setup: dict[str, Any] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        """The environment of a child process: this run's home and thread count, and the oneDNN cache bound the
        ``ssnarec`` command sets (unless the caller's environment says otherwise)."""
        n = str(self.threads)
        return {ONEDNN_CACHE[0]: ONEDNN_CACHE[1], **os.environ, "SSNAREC_HOME": str(self.home),
                "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "TOKENIZERS_PARALLELISM": "false"}

    def run(self, cmd: list[str], what: str) -> None:
        """Run CMD (output kept in a log; its tail is shown if it fails)."""
        log = self.scratch / f"{what}.log"
        with log.open("w") as fh:
            proc = subprocess.run(cmd, cwd=REPO, env=self.env(), stdout=fh, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
            raise RuntimeError(f"{what}: `{' '.join(cmd)}` failed (exit {proc.returncode}); its output ends:\n{tail}")

    def child(self, spec: dict[str, Any]) -> dict[str, Any]:
        """One training measurement (``train_child``) in a fresh process; returns its JSON result."""
        spec = {"threads": self.threads, "device": self.device, "autocast": self.autocast,
                "cache_dir": str(self.cache_dir), "runs": str(self.scratch / "runs"), **spec}
        name = (f"{spec['method']}-x{spec.get('scale', 1)}{'-memory' if spec.get('tensor_memory') else ''}"
                f"{'-checkpointed' if spec.get('grad_checkpointing') else ''}")
        spec_path, out = self.scratch / f"{name}.spec.json", self.scratch / f"{name}.out.json"
        spec_path.write_text(json.dumps(spec))
        self.run([sys.executable, "-m", "benchmarks.run", "--child-spec", str(spec_path), "--child-out", str(out)],
                 f"train-{name}")
        return json.loads(out.read_text())


# ------------------------------------------------------------------------------------------------ setup
def prepare_sci(ctx: Context, llm: str = "minilm") -> dict[str, Any]:
    """The Sci dataset and its store for LLM (registry name or model folder; default MiniLM) in the bench home
    (an already prepared dataset is kept as it is; the store is a cache hit after the first run)."""
    from featurestore import embed_items
    from pipeline import datasets, workspace
    from pipeline.datasets import DatasetMissing

    try:
        ds = datasets.load("sci")
    except DatasetMissing:
        datasets.prepare("sci", from_dir=ctx.sci)
        ds = datasets.load("sci")
    items = ds.items.sort("item_idx")
    started = time.perf_counter()
    store = embed_items(workspace.store_dir(), "sci", items["item_id"].to_list(),
                        items["text"].fill_null("").to_list(), llm, cache_dir=ctx.cache_dir,
                        max_length=MAX_TOKENS, device=ctx.device, progress=True)
    return {"dataset": {"users": ds.n_users, "items": ds.n_items, "path": str(ds.path)},
            "store": {"path": str(store.folder), "seconds": time.perf_counter() - started,
                      "cache_hit": bool((store.run_stats or {}).get("cache_hit"))}}


# ---------------------------------------------------------------------------------------------- groups
def group_stage1(ctx: Context) -> list[dict[str, Any]]:
    """bench_stage1.py: items/s of embed_items, vs a MoRec-style loop and a bare forward; the cache hit."""
    plan, out = ctx.plan, ctx.scratch / "stage1.json"
    cmd = [sys.executable, str(HERE / "bench_stage1.py"), "--data", str(ctx.sci), "--out", str(out),
           "--cache-dir", str(ctx.cache_dir), "--max-length", str(MAX_TOKENS), "--repeats", str(plan.stage1_repeats)]
    if plan.stage1_limit:
        cmd += ["--limit", str(plan.stage1_limit)]
    with load_window(ctx.hardware) as hw:
        ctx.run(cmd, "stage1")
    s = json.loads(out.read_text())
    hw = {**hw, "device": "cuda" if s["hardware"].get("gpu") else "cpu", "precision": s["precision"]}
    bounded = s["items"] < SCI_ITEMS
    scope = f"first {s['items']} of {SCI_ITEMS} Sci items" if bounded else f"all {s['items']} Sci items"
    how = (f"bench_stage1.py, {scope}, max_length {s['max_length']}, {s['precision']}, best of {s['repeats']} "
           f"round(s), wall time")
    per_s = {name: s[f"{name}_items_per_s"] for name in ("stage1", "morec_loop", "bare_forward", "bare_fp32_forward")}
    return [
        make_entry("stage1_items_per_s", s["stage1_items_per_s"], hardware=hw, bounded=bounded, measured=how,
                   values={"items": s["items"], "seconds": s["embed_seconds"], "store_shape": s["store_shape"],
                           "store_bytes": s["store_bytes"], "truncated_fraction": s["truncated_fraction"]}),
        make_entry("stage1_speedup_vs_morec_loop", s["stage1_speedup_vs_morec_loop"], hardware=hw, bounded=bounded,
                   measured=how, values={**per_s, "cpu_time_ratio": s["cpu_time_ratios"]["speedup_vs_morec_loop"]}),
        make_entry("stage1_fraction_of_bare_forward", s["stage1_fraction_of_bare_forward"], hardware=hw,
                   bounded=bounded, measured=how,
                   values={**per_s, "cpu_time_ratio": s["cpu_time_ratios"]["fraction_of_bare_forward"],
                           "bf16_speedup_bare_forward": s["bf16_speedup_bare_forward"]}),
        make_entry("cache_hit_seconds", s["cache_hit_seconds"], hardware=hw, bounded=bounded,
                   measured=f"second embed_items on the just-built store ({scope}), inside the call",
                   values={"seconds": s["cache_hit_seconds"], "items": s["items"]}),
    ]


def _train_how(row: dict[str, Any]) -> tuple[str, bool, int]:
    """(how an epoch time was measured, extrapolated?, optimiser steps it rests on) of a child's result."""
    steps = int(row["steps"])
    if row["extrapolated"]:
        how = (f"{row['batches_measured']} of {row['batches_per_epoch']} batches ({plural(steps, 'optimiser step')}), "
               "scaled to a full epoch")
        if row["device"].startswith("cuda"):
            how += ", from a cold start"
    else:
        warmup = int(row.get("warmup_epochs") or 0)
        how = f"{row['epochs'] - warmup} whole epoch(s) of {row['batches_per_epoch']} batches, median"
        if warmup:
            how += f", after {plural(warmup, 'warm-up epoch')} left out"
    return how, bool(row["extrapolated"]), steps


def _rss_mb(row: dict[str, Any]) -> tuple[float, float]:
    """A CPU run's (peak RSS during train.fit above the RSS just before it, the peak RSS itself) in MiB."""
    return row["peak_rss_mb"] - row["baseline_rss_mb"], row["peak_rss_mb"]


def peak_memory_mb(row: dict[str, Any]) -> float:
    """A child run's peak training memory as the paper measures it: on a GPU CUDA max_memory_allocated; on CPU
    (a ``tensor_memory`` child) the profiled tensor peak plus the store rows the run holds as a NumPy array (the
    profiler sees only torch's allocator; on a GPU those rows are a device tensor and count)."""
    if row["device"].startswith("cuda"):
        return row["fit_peak_memory_mb"]
    return row["tensor_peak_mb"] + row["feature_table_mb"]


def peak_memory_how(ssna: dict[str, Any], lora: dict[str, Any]) -> str:
    """How ``peak_memory_mb`` of these two child runs was measured."""
    if ssna["device"].startswith("cuda"):
        return "CUDA max_memory_allocated, each method in its own process"
    return (f"peak tensor memory (torch.profiler CPU allocations, + SSNA's store rows) over the "
            f"{plural(int(ssna['steps']), 'optimiser step')} of SSNA and {plural(int(lora['steps']), 'optimiser step')} "
            "of LoRA that encode the most items of an epoch, each method in its own profiled process")


def group_train(ctx: Context) -> list[dict[str, Any]]:
    """SSNA, TMoE (same batch) and LoRA training runs on real Sci, each in its own process."""
    plan = ctx.plan
    # On a GPU the first epoch is cold (every new batch shape costs the libraries and the caching allocator once:
    # 34 s against 7-10 s for the next ones on an H200), so whole-epoch runs there get one more, left out.
    warmup = int(not plan.train_steps and str(ctx.device).startswith("cuda"))
    store_run = {"steps": plan.train_steps, "epochs": 1 if plan.train_steps else plan.train_epochs + warmup,
                 "warmup_epochs": warmup}
    with load_window(ctx.hardware) as hw:
        ssna = ctx.child({"method": "ssna", "batch_size": SSNA_BATCH, "a": SSNA_A, **store_run})
        tmoe = ctx.child({"method": "tmoe", "batch_size": SSNA_BATCH, **store_run})
        lora = ctx.child({"method": "lora", "steps": plan.lora_steps, "epochs": 1})
    memory = _memory_entry(ctx, ssna, lora, hw)
    checkpointed = _checkpointed_memory_entry(ctx)
    ssna_how, ssna_x, ssna_steps = _train_how(ssna)
    tmoe_how, tmoe_x, _ = _train_how(tmoe)
    lora_how, lora_x, lora_steps = _train_how(lora)
    s, t, lo = ssna["seconds_per_epoch"], tmoe["seconds_per_epoch"], lora["seconds_per_epoch"]
    rows = {"ssna": ssna, "tmoe": tmoe, "lora": lora}
    brief = {name: {k: r.get(k) for k in ("seconds_per_epoch", "epoch_seconds", "warmup_epochs", "extrapolated",
                                           "batches_measured", "batches_per_epoch", "batch_size", "grad_accum",
                                           "steps", "peak_rss_mb", "baseline_rss_mb", "fit_peak_memory_mb",
                                           "trainable_params", "unique_items_per_batch", "cuda")}
             for name, r in rows.items()}
    return [
        make_entry("ssna_epoch_seconds_sci", s, hardware=hw, extrapolated=ssna_x, bounded=ssna_x,
                   steps=ssna_steps, measured=f"train.fit, SSNA, {ssna_how}, autocast {ctx.autocast}",
                   values=brief["ssna"]),
        make_entry("ssna_over_tmoe_epoch_ratio", s / t, hardware=hw, extrapolated=ssna_x or tmoe_x,
                   bounded=ssna_x or tmoe_x, steps=ssna_steps,
                   measured=f"SSNA and TMoE at batch {SSNA_BATCH}: {tmoe_how}",
                   values={"ssna": brief["ssna"], "tmoe": brief["tmoe"]}),
        make_entry("lora_over_ssna_epoch_ratio", lo / s, hardware=hw, extrapolated=True, bounded=True,
                   steps=lora_steps, measured=f"LoRA (batch 32 × 8 accumulated): {lora_how}; SSNA: {ssna_how}",
                   values={"lora": brief["lora"], "ssna": brief["ssna"]}),
        memory,
        checkpointed,
    ]


def _memory_entry(ctx: Context, ssna: dict[str, Any], lora: dict[str, Any], hw: dict[str, Any]) -> dict[str, Any]:
    """SSNA's peak training memory ÷ LoRA's (``peak_memory_mb``). On a GPU: the timed runs (HW, their load
    window). On CPU: two more runs, profiled, since profiling slows the timed ones; the timed runs' peak RSS
    beside it."""
    if ssna["device"].startswith("cuda"):
        s_mb, l_mb = peak_memory_mb(ssna), peak_memory_mb(lora)
        return make_entry("ssna_over_lora_peak_memory_ratio", s_mb / l_mb, hardware=hw, extrapolated=False,
                          bounded=True, steps=int(lora["steps"]), measured=peak_memory_how(ssna, lora),
                          values={"ssna_mb": s_mb, "lora_mb": l_mb})
    ssna_p, lora_p, profiled_hw = _memory_children(ctx, tensor_memory=True)
    (s_rss, s_total), (l_rss, l_total) = _rss_mb(ssna), _rss_mb(lora)
    return make_entry(
        "ssna_over_lora_peak_memory_ratio", peak_memory_mb(ssna_p) / peak_memory_mb(lora_p), hardware=profiled_hw,
        extrapolated=False, bounded=True, steps=int(lora_p["steps"]), measured=peak_memory_how(ssna_p, lora_p),
        values={**_memory_values(ssna_p, lora_p), "ssna_tensor_peak_mb": ssna_p["tensor_peak_mb"],
                "ssna_feature_table_mb": ssna_p["feature_table_mb"], "lora_tensor_peak_mb": lora_p["tensor_peak_mb"],
                "rss_ratio": s_rss / l_rss, "ssna_rss_mb": s_rss, "lora_rss_mb": l_rss,
                "ssna_peak_total_mb": s_total, "lora_peak_total_mb": l_total, "total_ratio": s_total / l_total,
                "rss_measured": "peak RSS (VmHWM) during the timed runs' train.fit above the RSS before it"})


def _checkpointed_memory_entry(ctx: Context) -> dict[str, Any]:
    """SSNA's peak training memory ÷ LoRA's with both recomputing their item encoder's activations in backward
    (``--grad-checkpointing``: LoRA's LLM layers, SSNA's adapters and GRU), the saving LoRA has at hand: two more
    runs over each epoch's heaviest batches, profiled on CPU, CUDA max allocated on a GPU."""
    ssna, lora, hw = _memory_children(ctx, tensor_memory=not str(ctx.device).startswith("cuda"),
                                      heaviest_first=True, grad_checkpointing=True)
    return make_entry("ssna_over_lora_peak_memory_ratio_checkpointed", peak_memory_mb(ssna) / peak_memory_mb(lora),
                      hardware=hw, extrapolated=False, bounded=True, steps=int(lora["steps"]),
                      measured=f"{peak_memory_how(ssna, lora)}, both with --grad-checkpointing",
                      values=_memory_values(ssna, lora))


def _memory_children(ctx: Context, **spec: Any) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The SSNA and LoRA children of a memory comparison (the plan's memory steps, SPEC added to both), and the
    hardware record of their load window."""
    plan = ctx.plan
    with load_window(ctx.hardware) as hw:
        ssna = ctx.child({"method": "ssna", "batch_size": SSNA_BATCH, "a": SSNA_A, "steps": plan.memory_steps,
                          "epochs": 1, **spec})
        lora = ctx.child({"method": "lora", "steps": plan.memory_lora_steps, "epochs": 1, **spec})
    return ssna, lora, hw


def _memory_values(ssna: dict[str, Any], lora: dict[str, Any]) -> dict[str, Any]:
    """What both memory entries record of their two children."""
    return {"ssna_mb": peak_memory_mb(ssna), "lora_mb": peak_memory_mb(lora), "ssna_steps": int(ssna["steps"]),
            "lora_steps": int(lora["steps"]), "ssna_max_unique_items": ssna["max_unique_items"],
            "lora_max_unique_items": lora["max_unique_items"]}


def cuda_ranking(device: str, repeats: int) -> dict[str, float] | None:
    """On a GPU: CUDA event seconds (median) and max allocated memory of ranking every Sci test user."""
    import torch

    from benchmarks.bench_eval import DIM
    from evaluate.metrics import full_ranking

    if not (str(device).startswith("cuda") and torch.cuda.is_available()):
        return None
    gen = torch.Generator().manual_seed(0)
    users = torch.nn.functional.normalize(torch.randn(SCI_USERS, DIM, generator=gen), dim=1).to(device)
    items = torch.nn.functional.normalize(torch.randn(SCI_ITEMS, DIM, generator=gen), dim=1).to(device)
    targets = torch.randint(0, SCI_ITEMS, (SCI_USERS,), generator=gen)
    full_ranking(users, items, targets)                 # warm-up
    times = []
    for _ in range(repeats):
        with CudaClock(device) as clock:
            full_ranking(users, items, targets)
        times.append(clock.result())
    return {"event_seconds": float(np.median([t["event_seconds"] for t in times])),
            "max_memory_allocated_mb": max(t["max_memory_allocated_mb"] for t in times)}


def group_eval(ctx: Context) -> list[dict[str, Any]]:
    """bench_eval.py: full ranking of all Sci test users over all items (d = 256)."""
    out = ctx.scratch / "eval.json"
    with load_window(ctx.hardware) as hw:
        ctx.run([sys.executable, str(HERE / "bench_eval.py"), "--repeats", str(ctx.plan.eval_repeats),
                 "--threads", str(ctx.threads), "--out", str(out)], "eval")
        cuda = cuda_ranking(ctx.device, ctx.plan.eval_repeats)
    e = json.loads(out.read_text())
    median = e["median_seconds"]
    return [make_entry(
        "eval_seconds_sci_test", median["full_ranking"], hardware=hw,
        measured=f"bench_eval.py, {e['users']} users × {e['items']} items, d {e['dim']}, CPU, median of "
                 f"{len(e['all_seconds']['full_ranking'])}",
        values={"median_seconds": median, "users": e["users"], "items": e["items"], "dim": e["dim"],
                "cuda": cuda})]


def timed_embed(ctx: Context, ids: list[str], texts: list[str]) -> tuple[float, dict[str, float] | None]:
    """Wall seconds (and CUDA event time and memory) of embed_items, end to end, into a fresh store."""
    from featurestore import embed_items

    with tempfile.TemporaryDirectory(prefix="stage1-scale-", dir=ctx.scratch) as tmp:
        with CudaClock(ctx.device) as clock:
            started = time.perf_counter()
            embed_items(Path(tmp), "synthetic", ids, texts, "minilm", cache_dir=ctx.cache_dir,
                        max_length=MAX_TOKENS, device=ctx.device, progress=False)
            seconds = time.perf_counter() - started
    return seconds, clock.result()


def stage1_scaling(ctx: Context, ids: list[str], texts: list[str]) -> dict[str, Any]:
    """End-to-end embed_items seconds (model load included) of IDS/TEXTS replicated at each scale, after an
    untimed warm-up; also the fixed cost (a run of WARMUP_ITEMS items) and the slope with it subtracted."""
    fixed, _ = timed_embed(ctx, ids[:WARMUP_ITEMS], texts[:WARMUP_ITEMS])     # warm-up: first load, caches
    fixed, _ = timed_embed(ctx, ids[:WARMUP_ITEMS], texts[:WARMUP_ITEMS])     # the fixed cost, warm
    rows = []
    for k in tqdm(ctx.plan.scales, desc="stage-one scaling", unit="scale", leave=False):
        seconds, cuda = timed_embed(ctx, [f"{item}~{c}" for c in range(k) for item in ids], texts * k)
        rows.append({"scale": k, "items": k * len(ids), "seconds": seconds, "cuda": cuda})
    items, seconds = [r["items"] for r in rows], [r["seconds"] for r in rows]
    marginal = [s - fixed for s in seconds]
    return {"rows": rows, "exponent": scaling_exponent(items, seconds), "fixed_seconds": fixed,
            "fixed_items": WARMUP_ITEMS,
            "exponent_without_fixed_cost": scaling_exponent(items, marginal) if min(marginal) > 0 else None}


def group_scaling(ctx: Context) -> list[dict[str, Any]]:
    """Stage one and an SSNA epoch at 1×, 4×, 16× (quick: 1×, 2×, 4×) a synthetic catalogue."""
    from pipeline import datasets

    plan = ctx.plan
    items = datasets.load("sci").items.sort("item_idx")
    ids, texts = items["item_id"].to_list(), items["text"].fill_null("").to_list()
    if plan.scale_items:
        ids, texts = ids[: plan.scale_items], texts[: plan.scale_items]
    scales = "×, ".join(str(k) for k in plan.scales) + "×"
    with load_window(ctx.hardware) as hw_stage1:
        stage1 = stage1_scaling(ctx, ids, texts)
    with load_window(ctx.hardware) as hw_ssna:
        runs = [ctx.child({"method": "ssna", "batch_size": SSNA_BATCH, "a": SSNA_A, "scale": k,
                           "users": plan.scale_users, "steps": None, "epochs": 1})
                for k in tqdm(plan.scales, desc="SSNA scaling", unit="scale", leave=False)]
    ssna_rows = [{"scale": k, "users": r["users"], "items": r["items"], "train_examples": r["train_examples"],
                  "batches": r["batches_per_epoch"], "unique_items_per_batch": r["unique_items_per_batch"],
                  "seconds": r["seconds_per_epoch"],
                  "peak_rss_mb": r["peak_rss_mb"], "cuda": r["cuda"]}
                 for k, r in zip(plan.scales, runs, strict=True)]
    base_items = f"the first {len(ids)} Sci items" if plan.scale_items else f"all {len(ids)} Sci items"
    base_users = (f"the first {plan.scale_users} Sci users and the {runs[0]['items']} items they touch"
                  if plan.scale_users else f"all {runs[0]['users']} Sci users and {runs[0]['items']} items")
    return [
        make_entry("stage1_scaling_exponent", stage1["exponent"], hardware=hw_stage1, bounded=bool(plan.scale_items),
                   measured=f"embed_items end to end (model load included) at {scales} {base_items}, "
                            "replicated with distinct ids, after a warm-up; log-log fit",
                   values={k: v for k, v in stage1.items() if k != "exponent"}),
        make_entry("ssna_epoch_scaling_exponent",
                   scaling_exponent([r["train_examples"] for r in ssna_rows], [r["seconds"] for r in ssna_rows]),
                   hardware=hw_ssna, bounded=bool(plan.scale_users),
                   measured=f"one whole SSNA epoch (train.fit, batch {SSNA_BATCH}, a = {SSNA_A}) at {scales} "
                            f"{base_users}, replicated with distinct ids; log-log fit",
                   values={"rows": ssna_rows, "exponent_vs_encoded_items": scaling_exponent(
                       [r["batches"] * r["unique_items_per_batch"] for r in ssna_rows],
                       [r["seconds"] for r in ssna_rows])}),
    ]


GROUP_FUNCTIONS: dict[str, Callable[[Context], list[dict[str, Any]]]] = {
    "stage1": group_stage1, "train": group_train, "eval": group_eval, "scaling": group_scaling}


# ------------------------------------------------------------------------------------- the child process
class _FitProbe:
    """Instruments ``train.fit`` in a bench child: evaluation replaced by a constant (training figures only),
    the trainable parameter count read at the first batch, and on CUDA the event time of each epoch's batches
    (first batch's loss → the end-of-epoch evaluation call)."""

    def __init__(self, cuda: bool):
        import torch

        self.torch, self.cuda = torch, cuda
        self.trainable: int | None = None
        self.unique_items: list[int] = []     # items each batch encodes (what a batch's cost follows)
        self.epoch_ms: list[float] = []
        self._start: Any = None

    def on_batch(self, model: Any, batch: Any) -> None:
        self.unique_items.append(batch_weight(batch))
        if self.trainable is None:
            self.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if self.cuda and self._start is None:
            self._start = self.torch.cuda.Event(enable_timing=True)
            self._start.record()

    def on_epoch_end(self) -> None:
        if self._start is not None:
            end = self.torch.cuda.Event(enable_timing=True)
            end.record()
            end.synchronize()
            self.epoch_ms.append(float(self._start.elapsed_time(end)))
            self._start = None

    @contextlib.contextmanager
    def installed(self) -> Iterator[_FitProbe]:
        import train.loop as loop
        from evaluate import METRIC_NAMES
        from train.model import SequentialRecommender

        original_eval, original_loss = loop.evaluate_examples, SequentialRecommender.loss
        probe = self

        def no_evaluation(model: Any, examples: Any, cfg: Any, device: Any) -> dict[str, np.ndarray]:
            probe.on_epoch_end()
            return {name: np.zeros(len(examples)) for name in METRIC_NAMES}

        def loss(model: Any, batch: Any, gather: Any = None) -> Any:
            probe.on_batch(model, batch)
            return original_loss(model, batch, gather)

        loop.evaluate_examples, SequentialRecommender.loss = no_evaluation, loss
        try:
            yield self
        finally:
            loop.evaluate_examples, SequentialRecommender.loss = original_eval, original_loss


class TensorMemoryPeak:
    """Peak MiB held by torch's CPU allocator inside a ``with`` block, counted from the block's start: the
    ``[memory]`` events of ``torch.profiler`` (``profile_memory=True``) carry the allocator's running total. The
    CPU counterpart of ``torch.cuda.max_memory_allocated``; memory outside torch's allocator (NumPy arrays,
    Python objects, libraries) is not in it."""

    CPU = 0          # the events' "Device Type" of the CPU

    def __init__(self, trace_dir: Path):
        self.trace_dir, self.peak_mb, self.events = trace_dir, float("nan"), 0

    def __enter__(self) -> TensorMemoryPeak:
        from torch.profiler import ProfilerActivity, profile

        self._profile = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._profile.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._profile.__exit__(*exc)
        if exc[0] is not None:
            return
        with tempfile.TemporaryDirectory(dir=self.trace_dir) as tmp:
            trace = Path(tmp) / "trace.json"
            self._profile.export_chrome_trace(str(trace))
            events = json.loads(trace.read_text())["traceEvents"]
        totals = [e["args"]["Total Allocated"] for e in events
                  if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == self.CPU]
        if not totals:
            raise RuntimeError("torch.profiler recorded no CPU allocation events: nothing ran in the profiled block")
        self.peak_mb, self.events = max(totals) / 2**20, len(totals)


def batch_weight(batch: Any) -> int:
    """The items a training batch encodes (history and targets, each once): what both SSNA's adapter activations
    and the in-loop LLM's grow with."""
    import torch

    return int(torch.unique(batch.touched()).numel())


@contextlib.contextmanager
def heaviest_batches_first() -> Iterator[None]:
    """Inside the block every epoch yields its own batches, heaviest first (``batch_weight``; the shuffled order
    breaks ties). A bounded run then meets the peak of its whole epoch in its first steps: the paper's memory
    figure is the maximum over training, and over a Sci epoch the heaviest batch of 32 encodes a third more items
    than the heaviest of the first 24 in shuffled order (252 against 189; of 256: 1074 against 1015)."""
    from train.data import Examples

    original = Examples.batches

    def batches(self: Any, *args: Any, **kwargs: Any) -> Iterator[Any]:
        epoch = list(original(self, *args, **kwargs))
        weights = [batch_weight(b) for b in epoch]
        yield from (epoch[i] for i in sorted(range(len(epoch)), key=lambda i: -weights[i]))

    Examples.batches = batches
    try:
        yield
    finally:
        Examples.batches = original


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0); False where not allowed.

    The peak RSS of ``getrusage`` (what ``train.fit`` records on CPU) cannot be used in a child process: Linux
    carries it across ``execve``, so a child started by a large parent reports at least the parent's RSS.
    VmHWM belongs to the child's own address space, and resetting it leaves out what came before training."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def train_child(spec: dict[str, Any]) -> dict[str, Any]:
    """One training measurement on (synthetic multiples of) real Sci, in this fresh process (see SPEC keys in
    ``Context.child`` and the groups)."""
    import torch

    from evaluate.results import read_epochs
    from featurestore import open_store
    from pipeline import datasets, workspace
    from train import ItemInputs, TrainConfig, fit, get_method, leave_one_out
    from train.loop import proc_status_mb

    torch.set_num_threads(spec["threads"])
    ds = datasets.load("sci")
    scale = int(spec.get("scale", 1))
    sequences, source = synthetic_sequences(ds.sequences, ds.n_items, scale, spec.get("users"))
    n_items = len(source)
    split = leave_one_out(sequences, n_items)
    llm = spec.get("llm", "minilm")   # registry name or model folder (stage one's store must exist for it)
    held_rows: list[int] = []     # bytes of the store rows the method reads (a NumPy array, unseen by the profiler)

    def store_rows(rows: np.ndarray) -> np.ndarray:
        held_rows.append(rows.nbytes)
        return rows

    if get_method(spec["method"]).uses_llm:
        texts = ds.items.sort("item_idx")["text"].fill_null("").to_list()
        inputs = ItemInputs(n_items, texts=[texts[i] for i in source], llm=llm,
                            cache_dir=Path(spec["cache_dir"]))
    else:
        store = open_store(workspace.store_dir(), "sci", llm)
        identity = scale == 1 and n_items == store.n_items
        inputs = ItemInputs(n_items, layers=lambda a: store_rows(
            store.top_layers(a) if identity else np.ascontiguousarray(store.top_layers(a)[source])))
    cfg = TrainConfig(method=spec["method"], dataset="sci", llm=llm, seed=0, a=spec.get("a"),
                      batch_size=spec.get("batch_size"), max_steps=spec.get("steps"), max_epochs=spec["epochs"],
                      patience=spec["epochs"], max_tokens=MAX_TOKENS, threads=spec["threads"],
                      autocast=spec["autocast"], device=spec["device"],
                      grad_checkpointing=bool(spec.get("grad_checkpointing")),
                      run_id=f"bench-{spec['method']}-x{scale}-{os.getpid()}")
    probe = _FitProbe(cuda=torch.cuda.is_available() and spec["device"] != "cpu")
    baseline = proc_status_mb("VmRSS")
    peak_reset = reset_peak_rss()
    memory = bool(spec.get("tensor_memory"))
    tensors = TensorMemoryPeak(Path(spec["runs"])) if memory else contextlib.nullcontext()
    order = heaviest_batches_first() if memory or spec.get("heaviest_first") else contextlib.nullcontext()
    started = time.perf_counter()
    with probe.installed(), order, tensors:
        result = fit(cfg, split, inputs, Path(spec["runs"]), progress=False)
    wall = time.perf_counter() - started
    epochs = read_epochs(result.run_dir)
    hparams = json.loads(result.row["hparams"])
    per_epoch = split.train.n_batches(hparams["batch_size"])
    measured = int(epochs["batches"].max())
    epoch_seconds = epochs["epoch_seconds"].to_list()
    warmup = int(spec.get("warmup_epochs") or 0)          # cold epochs, left out of the medians
    seconds_per_epoch = float(np.median(epoch_seconds[warmup:])) if warmup else result.row["seconds_per_epoch"]
    cuda = None
    if probe.epoch_ms:
        cuda = {"epoch_event_seconds": [ms / 1000 for ms in probe.epoch_ms],
                "seconds_per_epoch": float(np.median(probe.epoch_ms[warmup:])) / 1000 * per_epoch / measured,
                "max_memory_allocated_mb": torch.cuda.max_memory_allocated() / 2**20}
    shutil.rmtree(result.run_dir, ignore_errors=True)
    return {"method": spec["method"], "scale": scale, "users": len(sequences), "items": n_items,
            "train_examples": len(split.train), "batch_size": hparams["batch_size"],
            "grad_accum": hparams["grad_accum"], "batches_per_epoch": per_epoch, "batches_measured": measured,
            "steps": -(-measured // hparams["grad_accum"]), "epochs": len(epochs),
            "epoch_seconds": epoch_seconds, "seconds_per_epoch": seconds_per_epoch, "warmup_epochs": warmup,
            "extrapolated": result.row["seconds_extrapolated"],
            "fit_peak_memory_mb": result.row["peak_memory_mb"], "device": result.row["device"],
            "baseline_rss_mb": baseline, "peak_rss_mb": proc_status_mb("VmHWM"), "peak_rss_reset": peak_reset,
            "trainable_params": probe.trainable, "unique_items_per_batch": float(np.mean(probe.unique_items)),
            "max_unique_items": max(probe.unique_items, default=0),
            "cuda": cuda, "wall_seconds": wall, "feature_table_mb": sum(held_rows) / 2**20,
            **({"tensor_peak_mb": tensors.peak_mb, "tensor_memory_events": tensors.events}
               if isinstance(tensors, TensorMemoryPeak) else {})}


# ------------------------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    from pipeline import workspace

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    project_home = Path(os.environ.get(workspace.ENV_VAR) or REPO / workspace.DEFAULT_HOME)
    shared = Path(os.environ.get("SSNAREC_SHARED_DATA", REPO.parent / "shared" / "data"))
    add = parser.add_argument
    add("--quick", action="store_true", help="the ≤ 5-minute mode: bounded runs and small scales (default: full)")
    add("--only", default=",".join(GROUPS), help="comma-separated groups to run (default: %(default)s)")
    add("--threads", type=int, default=None,
        help="torch threads here and in every child (default: $OMP_NUM_THREADS, else torch's default)")
    add("--device", default="auto", help="auto (CUDA when present) | cpu | cuda (default: %(default)s)")
    add("--autocast", default="off", help="training autocast: off | bf16 | auto (default: %(default)s, as `make train`)")
    add("--home", type=Path, default=project_home / "bench",
        help="SSNAREC_HOME of the bench: dataset, store, scratch (default: %(default)s)")
    add("--cache-dir", type=Path, default=project_home / "cache",
        help="wheel and model cache, shared with the project (default: %(default)s)")
    add("--data", type=Path, default=shared / "amazon-sci-unisrec", help="UniSRec Sci folder (default: %(default)s)")
    add("--out-dir", type=Path, default=RESULTS_DIR, help="results folder (default: %(default)s)")
    add("--scales", default=None, help="catalogue multiples of the scaling group, e.g. 1,4,16 (default: quick 1,2,4; "
        "full 1,4,16)")
    add("--lora-steps", type=int, default=None, help="LoRA optimiser steps (default: quick 1, full 10)")
    add("--train-steps", type=int, default=None,
        help="SSNA/TMoE optimiser steps, 0 = whole epochs (default: quick 8, full whole epochs)")
    add("--memory-steps", default=None, help="optimiser steps of the profiled tensor-memory runs on CPU, as "
        "SSNA,LORA (default: quick 8,1; full 30,3)")
    add("--stage1-items", type=int, default=None, help="Sci items in the stage-one comparison, 0 = all "
        "(default: quick 256, full all)")
    add("--child-spec", type=Path, help=argparse.SUPPRESS)
    add("--child-out", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def make_plan(args: argparse.Namespace) -> Plan:
    """The mode's plan with the command-line overrides applied."""
    plan = QUICK if args.quick else FULL
    if args.scales:
        try:
            scales = tuple(sorted({int(x) for x in args.scales.split(",") if x.strip()}))
        except ValueError:
            raise SystemExit(f"--scales {args.scales!r}: give comma-separated integers, e.g. 1,4,16") from None
        if len(scales) < 2 or scales[0] < 1:
            raise SystemExit(f"--scales {args.scales!r}: need at least two distinct multiples >= 1")
        plan = replace(plan, scales=scales)
    if args.lora_steps is not None:
        plan = replace(plan, lora_steps=max(1, args.lora_steps))
    if args.train_steps is not None:
        plan = replace(plan, train_steps=args.train_steps or None)
    if args.memory_steps:
        try:
            ssna_steps, lora_steps = (int(x) for x in args.memory_steps.split(","))
        except ValueError:
            raise SystemExit(f"--memory-steps {args.memory_steps!r}: give two integers, SSNA,LORA, e.g. 30,3") from None
        plan = replace(plan, memory_steps=max(1, ssna_steps), memory_lora_steps=max(1, lora_steps))
    if args.stage1_items is not None:
        plan = replace(plan, stage1_limit=args.stage1_items or None)
    return plan


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child_spec:
        args.child_out.write_text(json.dumps(train_child(json.loads(args.child_spec.read_text())), default=str))
        return
    groups = [g.strip() for g in args.only.split(",") if g.strip()]
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown or not groups:
        raise SystemExit(f"--only {args.only!r}: unknown group(s) {unknown}; choose from {', '.join(GROUPS)}")
    if not args.data.is_dir():
        raise SystemExit(f"--data {args.data}: no such folder (the UniSRec Sci files). Fix: point --data (or "
                         "SSNAREC_SHARED_DATA) at the shared data.")
    import torch

    from featurestore.embed import resolve_device

    device = resolve_device(args.device)      # "auto" → cuda or cpu: the CUDA clocks key on the name
    threads = args.threads or int(os.environ.get("OMP_NUM_THREADS") or 0) or torch.get_num_threads()
    torch.set_num_threads(threads)
    home = args.home.expanduser().resolve()
    os.environ["SSNAREC_HOME"] = str(home)
    home.mkdir(parents=True, exist_ok=True)
    started, load_before = time.time(), loadavg()
    scratch = Path(tempfile.mkdtemp(prefix=".bench-scratch-", dir=home))
    (scratch / "runs").mkdir()
    ctx = Context(plan=make_plan(args), home=home, cache_dir=args.cache_dir.expanduser().resolve(),
                  sci=args.data.resolve(), scratch=scratch, threads=threads, device=device,
                  autocast=args.autocast)
    ctx.hardware = hardware_base(threads, device)
    entries: dict[str, dict[str, Any]] = {}
    errors: dict[str, str] = {}      # a failed group is reported; the others' figures are still written
    try:
        if {"train", "scaling"} & set(groups):
            ctx.setup = prepare_sci(ctx)
        for group in tqdm(groups, desc="bench", unit="group"):
            try:
                for entry in GROUP_FUNCTIONS[group](ctx):
                    entries[entry["key"]] = entry
            except Exception as exc:   # one failed group must not lose the others' figures
                errors[group] = f"{type(exc).__name__}: {exc}"
                tqdm.write(f"bench group {group!r} failed: {errors[group]}", file=sys.stderr)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    from pipeline.stages import git_commit

    finished = time.time()
    payload = {
        "schema_version": SCHEMA_VERSION, "mode": "quick" if args.quick else "full",
        "partial": set(groups) != set(GROUPS) or bool(errors), "groups": groups, "errors": errors,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)), "finished_unix": finished,
        "wall_seconds": finished - started, "git_commit": git_commit(),
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.run", *(argv or sys.argv[1:])]),
        "settings": {**asdict(ctx.plan), "threads": threads, "device": device, "autocast": args.autocast,
                     "home": str(home), "cache_dir": str(ctx.cache_dir), "data": str(ctx.sci)},
        "setup": ctx.setup,
        "hardware": {**ctx.hardware, "loadavg_before": load_before, "loadavg_after": loadavg()},
        "entries": {key: entries[key] for key in KEYS if key in entries},
    }
    if not entries:
        raise SystemExit("no figure was measured: " + "; ".join(f"{g}: {e}" for g, e in errors.items()))
    latest, dated = write_results(payload, args.out_dir)
    print(format_table(payload))
    print(f"wrote {latest} and {dated}")
    if errors:
        raise SystemExit(f"{len(errors)} group(s) failed ({', '.join(errors)}); the others' figures were written, "
                         "flagged partial")


if __name__ == "__main__":
    main()
