"""The registered dataset names, as data: where each comes from, its k-core, and how its item text is built."""

from __future__ import annotations

from dataclasses import dataclass

AMAZON_PAGE = 'the "Amazon Review Data (2018)" page by Jianmo Ni (UCSD): https://nijianmo.github.io/amazon/'

# Item text recipes (the strings are recorded in meta.json).
UNISREC_TEXT = "title. categories. brand. (UniSRec: HTML unescaped, tags removed)"
MOVIELENS_TEXT = "title (year). genres"


@dataclass(frozen=True)
class DatasetSpec:
    """One registered dataset.

    kind: "amazon" (raw Amazon Review 2018 files, or a UniSRec processed folder via --from) or "movielens".
    category: the 2018 category whose files are looked for under $SSNAREC_HOME/raw/<category>/.
    k: k-core threshold for users and items (applied iteratively until stable).
    unisrec_prefix: file prefix of a UniSRec processed folder for this dataset (``<prefix>.train.inter``).
    unisrec_hint: a known UniSRec folder to mention when nothing is found.
    """

    name: str
    kind: str
    category: str | None
    k: int
    text_recipe: str
    unisrec_prefix: str | None = None
    unisrec_hint: str | None = None


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec("sci", "amazon", "Industrial_and_Scientific", 5, UNISREC_TEXT, "Scientific",
                    "../shared/data/amazon-sci-unisrec"),
        DatasetSpec("pantry", "amazon", "Prime_Pantry", 5, UNISREC_TEXT, "Pantry"),
        DatasetSpec("tools", "amazon", "Tools_and_Home_Improvement", 11, UNISREC_TEXT, "Tools"),
        DatasetSpec("toys", "amazon", "Toys_and_Games", 10, UNISREC_TEXT, "Toys"),
        DatasetSpec("ins", "amazon", "Musical_Instruments", 5, UNISREC_TEXT, "Instruments",
                    "../shared/data/amazon-ins-mql4grec"),
        DatasetSpec("ml100k", "movielens", None, 5, MOVIELENS_TEXT),
    )
}

# Default k-core for a dataset given as a path whose category is not registered.
DEFAULT_K = 5


def spec_for_category(category: str) -> DatasetSpec | None:
    """The registered spec whose Amazon category is CATEGORY, if any."""
    return next((s for s in DATASETS.values() if s.category == category), None)
