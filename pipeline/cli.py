"""The ``ssnarec`` command line: one typer app; each command group lives in ``pipeline/commands/``."""

from __future__ import annotations

import os

import typer

from pipeline.commands import data, demo, embed, evaluation, recommend, training

app = typer.Typer(
    name="ssnarec",
    help="SSNA for sequential recommendation: stage one caches per-layer LLM embeddings, stage two trains from them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

for module in (data, embed, training, evaluation, recommend, demo):
    module.register(app)


# oneDNN (torch's CPU GEMMs) keeps up to 1024 compiled primitives, one per distinct shape. Stage two's batches
# change shape every step, and under bf16 that cache grew a Sci SSNA run's RSS by ~1 GB in 80 steps; with no cache
# the growth is a third of that at the same speed (README, "Memory"). Read by oneDNN at its first use.
ONEDNN_CACHE = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "0")


def main() -> None:
    os.environ.setdefault(*ONEDNN_CACHE)
    app()


if __name__ == "__main__":
    main()
