"""`clipsearch label`: score stored embeddings against each label set's class embeddings.

No image is decoded: a shard's vectors are read back from embeddings.npy in blocks and
multiplied with the class embeddings. Only shards not yet labelled under a set's newest version
are read, so a nightly run labels just the new images, and an edited set relabels everything
(beside the served labels, which it replaces in one commit at the end).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sqlalchemy.exc import IntegrityError
from tqdm import tqdm

from indexer.binding import claim_problem
from indexer.crash import crash_point
from indexer.lock import IndexLock
from retrieval.catalog.database import Catalog
from retrieval.catalog.schema import require_catalog
from retrieval.config import Settings
from retrieval.errors import CorruptShard, NotFound
from retrieval.index.shard import iter_embedding_blocks
from retrieval.labels.scoring import ClassEmbeddings, score_block
from retrieval.labels.store import LabelStore, StoredLabelSet
from retrieval.models.encoder import Encoder
from retrieval.models.identity import ModelIdentity

log = logging.getLogger(__name__)


@dataclass
class SetReport:
    """What one pass did for one label set."""

    set: str
    version: int
    shards: int = 0
    images: int = 0
    labelled: int = 0
    rows: int = 0
    published: bool = False
    seconds: float = 0.0
    skipped: str | None = None
    # Shards whose stored vectors failed their checksum: not labelled (repair them).
    corrupt_shards: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data["seconds"] = round(self.seconds, 3)
        data["unlabelled"] = self.images - self.labelled
        return data


@dataclass
class LabelReport:
    sets: list[SetReport] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def images(self) -> int:
        return sum(s.images for s in self.sets)

    def to_dict(self) -> dict[str, Any]:
        return {"sets": [s.to_dict() for s in self.sets], "seconds": round(self.seconds, 3)}


class LabelJob:
    """Label the corpus under every label set (or the named ones). Collaborators come in."""

    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        encoder_factory: Callable[[], Encoder],
        *,
        store: LabelStore | None = None,
        progress: bool | None = None,
    ) -> None:
        self.settings = settings
        self.catalog = catalog
        self.store = store or LabelStore(catalog)
        self.encoder_factory = encoder_factory
        self._encoder: Encoder | None = None
        self.index_dir = settings.resolved_index_dir
        self.progress_disabled = None if progress is None else not progress

    def run(self, set_names: Sequence[str] | None = None) -> LabelReport:
        """Take the single-writer lock and label; see `run_locked`."""
        # Never created nor migrated here; checked before the lock, so that no catalog leaves
        # no index dir or lock file behind either.
        require_catalog(self.catalog, self.index_dir)
        self.index_dir.mkdir(parents=True, exist_ok=True)
        with IndexLock(self.index_dir):
            problem = claim_problem(self.catalog, self.index_dir)
            if problem is not None:
                raise problem  # its shard ids would name another index's vectors
            return self.run_locked(set_names)

    def run_locked(self, set_names: Sequence[str] | None = None) -> LabelReport:
        """Label every shard not yet labelled under each set's newest version, then publish.

        The caller holds the IndexLock (the index job calls this after its commits).
        """
        started = time.monotonic()
        report = LabelReport()
        self.store.drop_stale()
        label_sets = self.store.all()
        if set_names:
            known = {s.name for s in label_sets}
            missing = [name for name in set_names if name not in known]
            if missing:
                raise NotFound(f"No label set named {missing[0]!r}.")
            label_sets = [s for s in label_sets if s.name in set_names]
        state = self.catalog.state()
        shards = self.catalog.shards()
        tombstones = self.catalog.tombstones_by_shard()
        for label_set in label_sets:
            set_started = time.monotonic()
            done = SetReport(label_set.name, label_set.version)
            report.sets.append(done)
            try:
                labelled = self.store.labelled_shards(label_set.version_id)
                todo = [shard for shard in shards if shard.id not in labelled]
                if todo:
                    assert state.model is not None  # shards exist, so a model indexed them
                    classes = self._classes(label_set, state.model)
                    self._label_shards(label_set, classes, todo, tombstones, done)
                if label_set.labelled_version != label_set.version:
                    crash_point("before_label_publish")
                    done.published = self.store.publish(label_set.id, label_set.version)
            except IntegrityError:
                # The set (or this version of it) was deleted while we wrote its labels; the
                # transaction of the shard in hand rolled back.
                done.skipped = "deleted while labelling"
                log.warning("label set %s was deleted while labelling; skipped", label_set.name)
            done.seconds = time.monotonic() - set_started
        self.store.drop_stale()
        report.seconds = time.monotonic() - started
        return report

    @property
    def encoder(self) -> Encoder:
        if self._encoder is None:
            self._encoder = self.encoder_factory()
        return self._encoder

    def _classes(self, label_set: StoredLabelSet, model: dict[str, Any]) -> ClassEmbeddings:
        """Cached class embeddings for the indexed model, else encode the prompts once."""
        indexed = ModelIdentity.from_dict(model)
        found = self.store.cached_embeddings(label_set.version_id, indexed.key)
        if found is not None:
            return found
        self.encoder.identity.require_same(indexed)
        prompts = sum(len(group) for group in label_set.definition.prompt_groups())
        bar = tqdm(
            total=prompts,
            desc=f"prompts {label_set.name}",
            unit=" prompt",
            disable=self.progress_disabled,
            leave=False,
        )
        try:
            return self.store.embeddings_for(
                label_set.version_id, self.encoder, on_batch=bar.update
            )
        finally:
            bar.close()

    def _label_shards(
        self,
        label_set: StoredLabelSet,
        classes: ClassEmbeddings,
        shards: list[Any],
        tombstones: dict[str, np.ndarray],
        done: SetReport,
    ) -> None:
        definition = label_set.definition
        min_probability, min_cosine = definition.thresholds()
        bar = tqdm(
            total=sum(shard.count for shard in shards),
            desc=f"label {label_set.name}",
            unit=" img",
            disable=self.progress_disabled,
            smoothing=0.1,
        )
        try:
            for shard in shards:
                dead = tombstones.get(shard.id)
                # One transaction per shard: its labels and its "labelled" mark, or nothing.
                try:
                    with self.store.shard_writer(
                        label_set.version_id, shard.id, store_cosine=definition.store_cosine
                    ) as writer:
                        for ids, vectors in iter_embedding_blocks(
                            self.index_dir, shard.id, self.settings.label_block_size
                        ):
                            block = score_block(
                                vectors, classes, definition.top_k, min_probability, min_cosine
                            )
                            alive = None if dead is None else ~np.isin(ids, dead)
                            writer.add(ids, block, alive)
                            bar.update(len(ids))
                            crash_point("during_labels")
                except CorruptShard as exc:
                    # Rolled back: no label comes from vectors that fail their checksum.
                    done.corrupt_shards.append(shard.id)
                    log.error(
                        "not labelling shard %s (clipsearch repair fixes it): %s", shard.id, exc
                    )
                    continue
                done.shards += 1
                done.images += writer.images
                done.labelled += writer.labelled
                done.rows += writer.rows
        finally:
            bar.close()
