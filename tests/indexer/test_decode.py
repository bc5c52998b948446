"""The indexer's decoding: the decode budget turns an image away before it is decoded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from indexer.decode import DecodedMeta, DecodeFailure, iterate_decoded
from retrieval.images import DecodeCost


def test_an_image_over_the_decode_budget_fails_as_too_large_and_the_rest_decode(
    tmp_path: Path,
) -> None:
    grey, floats = tmp_path / "grey.png", tmp_path / "floats.tif"
    Image.new("L", (600, 600), 7).save(grey)
    Image.fromarray(np.full((600, 600), 0.5, np.float32), "F").save(floats)
    # The same pixels: 0.36 MB as 8-bit grey, 1.44 MB as floats (plus 1.44 MB of RGB each).
    budget = 2 * 1024 * 1024
    assert DecodeCost(360_000, 0, 1_440_000, 1).total <= budget < 2 * 1_440_000
    (batch,) = iterate_decoded(
        [str(floats), str(grey)],
        lambda image: torch.from_numpy(np.asarray(image, dtype=np.float32)),
        batch_size=2,
        workers=0,
        max_pixels=10**8,
        max_bytes=budget,
    )
    assert batch.indices == [1]
    assert batch.metas == [DecodedMeta(600, 600, "PNG")]
    ((position, failure),) = batch.failures
    assert position == 0 and isinstance(failure, DecodeFailure)
    assert failure.reason == "too_large" and "more than the 2097152 allowed" in failure.detail
