"""Improvement percentages and paired t-tests over users (the paper's Table 5).

The paper marks an improvement as significant at the 85% confidence level, i.e. p < 0.15 in a paired t-test.
We use scipy's two-sided ``ttest_rel`` on per-user test metrics and star an improvement only when it is
positive and p < alpha. When a method has several seeds, each user's metric is first averaged over the seeds
both methods share (all seeds of each if they share none), so the test pairs users, not runs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl
from scipy import stats

from evaluate import METRIC_NAMES

SIGNIFICANCE_ALPHA = 0.15


def improvement_pct(ours: float | None, base: float | None) -> float | None:
    """(ours - base) / base * 100; None when either value is missing or base is 0."""
    if ours is None or base is None or base == 0 or math.isnan(ours) or math.isnan(base):
        return None
    return (ours - base) / base * 100.0


def paired_ttest(ours: np.ndarray, base: np.ndarray, alternative: str = "two-sided") -> float:
    """p-value of scipy's paired t-test between two equally long per-user arrays (NaN if undefined).

    Identical arrays (zero variance of the differences) give NaN, which is never significant.
    """
    ours, base = np.asarray(ours, np.float64), np.asarray(base, np.float64)
    if ours.shape != base.shape:
        raise ValueError(f"paired arrays differ in shape: {ours.shape} vs {base.shape}")
    if ours.size < 2 or np.all(ours == base):
        return float("nan")
    return float(stats.ttest_rel(ours, base, alternative=alternative).pvalue)


def is_significant(p: float | None, improvement: float | None, alpha: float = SIGNIFICANCE_ALPHA) -> bool:
    """True when the improvement is positive and p < alpha."""
    return p is not None and not math.isnan(p) and p < alpha and improvement is not None and improvement > 0


def seed_averaged(per_seed: Mapping[int, pl.DataFrame], seeds: Sequence[int]) -> pl.DataFrame:
    """Average per-user metrics over the given seeds; only users present in every seed are kept."""
    frames = [per_seed[s].select("user_idx", *METRIC_NAMES) for s in seeds]
    if not frames:
        raise ValueError("no seeds to average")
    stacked = pl.concat(frames, how="vertical")
    return (
        stacked.group_by("user_idx")
        .agg(pl.len().alias("_n"), *(pl.col(m).mean() for m in METRIC_NAMES))
        .filter(pl.col("_n") == len(frames))
        .drop("_n")
        .sort("user_idx")
    )


@dataclass(frozen=True)
class PairedUsers:
    """Per-user metrics of two methods, aligned on the same users (seed-averaged)."""

    ours: pl.DataFrame
    base: pl.DataFrame
    seeds_ours: tuple[int, ...]
    seeds_base: tuple[int, ...]


def pair_users(ours: Mapping[int, pl.DataFrame], base: Mapping[int, pl.DataFrame]) -> PairedUsers:
    """Seed-average both methods over shared seeds (all of each if none shared) and align on user_idx."""
    shared = sorted(set(ours) & set(base))
    seeds_o, seeds_b = (shared, shared) if shared else (sorted(ours), sorted(base))
    a = seed_averaged(ours, seeds_o)
    b = seed_averaged(base, seeds_b)
    joined = a.join(b, on="user_idx", how="inner", suffix="_base").sort("user_idx")
    return PairedUsers(
        ours=joined.select("user_idx", *METRIC_NAMES),
        base=joined.select("user_idx", *(pl.col(f"{m}_base").alias(m) for m in METRIC_NAMES)),
        seeds_ours=tuple(seeds_o),
        seeds_base=tuple(seeds_b),
    )


def paired_test_by_metric(pairs: Sequence[PairedUsers], alternative: str = "two-sided") -> dict[str, tuple[float, float]]:
    """For each metric: (mean per-user difference ours - base, p-value), users of all pairs pooled.

    Pooling lets one test cover several datasets, as in Table 5 (one cell per LLM across datasets).
    """
    out: dict[str, tuple[float, float]] = {}
    for m in METRIC_NAMES:
        ours = np.concatenate([p.ours[m].to_numpy() for p in pairs]) if pairs else np.zeros(0)
        base = np.concatenate([p.base[m].to_numpy() for p in pairs]) if pairs else np.zeros(0)
        diff = float(np.mean(ours - base)) if ours.size else float("nan")
        out[m] = (diff, paired_ttest(ours, base, alternative))
    return out
