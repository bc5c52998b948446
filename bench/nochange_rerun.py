"""A nightly run with nothing new: cost must be one stat per file and no decoding.

Builds a folder of small images (default 20,000), indexes it once with the tiny model,
then times a second `clipsearch index` over the unchanged folder. Prints one JSON line.

    python bench/nochange_rerun.py --n 20000
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from indexer.pipeline import IndexJob
from retrieval.catalog.database import Catalog
from retrieval.config import load_settings  # noqa: E402
from retrieval.models.encoder import load_encoder
from retrieval.models.identity import ModelSpec


def write_small_files(root: Path, n: int) -> None:
    """n distinct 16x16 PNGs in folders of 1000 (distinct bytes, so none is a 'copy')."""
    for i in range(n):
        folder = root / f"d{i // 1000:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        image = Image.new("RGB", (16, 16), (i % 256, (i // 256) % 256, (i // 65536) % 256))
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        (folder / f"{i:06d}.png").write_bytes(buffer.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000)
    args = parser.parse_args()
    encoder = load_encoder(ModelSpec("clipsearch-tiny", "none", device="cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "pics"
        write_small_files(root, args.n)
        settings = load_settings(
            data_dir=Path(tmp) / "data", model="clipsearch-tiny", pretrained="none", batch_size=256
        )
        catalog = Catalog(settings.resolved_database_url)
        started = time.perf_counter()
        first = IndexJob(settings, catalog, lambda: encoder, progress=False).run([root])
        first_seconds = time.perf_counter() - started
        started = time.perf_counter()
        second = IndexJob(settings, catalog, lambda: encoder, progress=False).run([root])
        second_seconds = time.perf_counter() - started
        catalog.dispose()
    print(
        json.dumps(
            {
                "bench": "nochange_rerun",
                "files": args.n,
                "first_run_seconds": round(first_seconds, 2),
                "first_run_encoded": first.encoded,
                "rerun_seconds": round(second_seconds, 3),
                "rerun_files_per_second": round(args.n / second_seconds, 1),
                "rerun_decoded": second.decoded,
                "rerun_encoded": second.encoded,
                "rerun_unchanged": second.unchanged,
            }
        )
    )


if __name__ == "__main__":
    main()
