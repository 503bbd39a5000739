"""The paper's best hyper-parameters (Appendix, Tables S1–S3) as data, and how a run's unset fields are filled.

Columns: LoRA dropout p, AdaLoRA ("ADA") dropout p, Full top layers n_t, TMLP batch b and depth n_l,
TMoE batch b, SSNA batch b and adapted layers a.
"""

from __future__ import annotations

from typing import Any

from featurestore.llms import split_pooling

COLUMNS = ("lora_p", "adalora_p", "full_n_t", "tmlp_b", "tmlp_n_l", "tmoe_b", "ssna_b", "ssna_a")

# (llm, dataset) -> values in COLUMNS order.  S1: DistilBERT, S2: DistilRoBERTa, S3: BERT-medium.
PAPER_TABLES: dict[tuple[str, str], tuple[float, ...]] = {
    ("distilbert", "sci"): (0.1, 0.2, 2, 256, 3, 128, 256, 3),
    ("distilbert", "pantry"): (0.3, 0.1, 2, 256, 2, 128, 256, 2),
    ("distilbert", "tools"): (0.1, 0.2, 2, 256, 3, 256, 256, 3),
    ("distilbert", "toys"): (0.3, 0.3, 2, 256, 3, 256, 256, 2),
    ("distilbert", "ins"): (0.3, 0.3, 4, 256, 2, 256, 256, 2),
    ("distilroberta", "sci"): (0.2, 0.3, 2, 256, 3, 128, 64, 3),
    ("distilroberta", "pantry"): (0.3, 0.2, 2, 256, 1, 256, 256, 2),
    ("distilroberta", "tools"): (0.1, 0.2, 2, 128, 3, 64, 256, 3),
    ("distilroberta", "toys"): (0.3, 0.3, 2, 256, 3, 256, 256, 2),
    ("distilroberta", "ins"): (0.3, 0.3, 2, 256, 2, 256, 256, 2),
    ("bertmedium", "sci"): (0.2, 0.1, 2, 256, 3, 64, 256, 2),
    ("bertmedium", "pantry"): (0.2, 0.1, 2, 256, 3, 256, 256, 2),
    ("bertmedium", "tools"): (0.2, 0.1, 2, 256, 3, 64, 256, 3),
    ("bertmedium", "toys"): (0.3, 0.3, 2, 256, 3, 256, 256, 2),
    ("bertmedium", "ins"): (0.3, 0.3, 4, 256, 3, 256, 256, 2),
}

# An LLM the paper did not use borrows the row of the paper LLM with the same depth (6 layers: DistilBERT).
LLM_ALIASES = {"minilm": "distilbert"}

# Used where the paper has no row at all (e.g. ml100k): the most common values across the three tables.
FALLBACK = dict(lora_p=0.3, adalora_p=0.3, full_n_t=2, tmlp_b=256, tmlp_n_l=3, tmoe_b=256, ssna_b=256, ssna_a=2)


def paper_row(llm: str, dataset: str) -> tuple[dict[str, Any], str]:
    """The paper's best settings for (llm, dataset) as a dict, and where they came from (for the run record)."""
    llm = split_pooling(llm)[0]                               # the paper's rows are per model, any pooling
    key = (LLM_ALIASES.get(llm, llm), dataset)
    if key in PAPER_TABLES:
        values = dict(zip(COLUMNS, PAPER_TABLES[key], strict=True))
        source = f"paper table row {key[0]}/{key[1]}" + (f" (alias of {llm})" if llm != key[0] else "")
        return values, source
    return dict(FALLBACK), "fallback (no paper row)"


def method_defaults(method: str, llm: str, dataset: str) -> tuple[dict[str, Any], str]:
    """The TrainConfig fields a method takes from the tables (batch_size, a, n_l, p, n_t), and their source."""
    row, source = paper_row(llm, dataset)
    picks: dict[str, Any] = {
        "ssna": {"batch_size": row["ssna_b"], "a": row["ssna_a"], "grad_accum": 1},
        "mean": {"batch_size": row["ssna_b"], "a": row["ssna_a"], "grad_accum": 1},
        "weighted": {"batch_size": row["ssna_b"], "a": row["ssna_a"], "grad_accum": 1},
        "tmoe": {"batch_size": row["tmoe_b"], "a": 1, "grad_accum": 1},
        "tmlp": {"batch_size": row["tmlp_b"], "a": 1, "n_l": row["tmlp_n_l"], "grad_accum": 1},
        # The paper trains the MLT baselines with batch 32 and gradients accumulated over 8 batches.
        "lora": {"batch_size": 32, "grad_accum": 8, "p": row["lora_p"]},
        "adalora": {"batch_size": 32, "grad_accum": 8, "p": row["adalora_p"]},
        "full": {"batch_size": 32, "grad_accum": 8, "n_t": row["full_n_t"]},
    }
    if method not in picks:
        raise KeyError(f"no paper defaults for method {method!r}; known: {sorted(picks)}")
    return {k: int(v) if isinstance(v, float) and v.is_integer() and k != "p" else v
            for k, v in picks[method].items()}, source
