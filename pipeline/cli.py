"""The ``ssnarec`` command line: one typer app; each command group lives in ``pipeline/commands/``."""

from __future__ import annotations

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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
