"""`clipsearch demo`: the offline demo on generated pictures."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from retrieval.config import load_settings


def demo(
    directory: Annotated[
        Path, typer.Option("--dir", help="Where to put the demo pictures and index.")
    ] = Path("demo-data"),
    count: Annotated[int, typer.Option(help="How many pictures to generate.")] = 240,
) -> None:
    """Generate a small picture folder, index it, and run a few searches (works offline)."""
    from indexer.tour import run_demo

    run_demo(directory, count, base=load_settings(), echo=typer.echo)
