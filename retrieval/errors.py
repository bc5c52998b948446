"""Domain exceptions. Each carries fields, so the API and CLI can map them in one place."""

from __future__ import annotations

from typing import Any


class ClipsearchError(Exception):
    """Base class: every error the core raises on purpose."""

    code = "error"

    def __reduce__(self) -> tuple[Any, ...]:
        # Errors cross processes (a Ray worker's reach the indexer): rebuilt from their message
        # and fields, whatever their __init__ takes.
        return (_rebuilt, (type(self), self.args, dict(self.__dict__)))


def _rebuilt(cls: type[ClipsearchError], args: tuple[Any, ...], fields: dict[str, Any]) -> Any:
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(fields)
    return error


class ConfigError(ClipsearchError):
    """A setting has a bad value; `setting` names the environment variable."""

    code = "bad_setting"

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(f"Invalid setting {setting}: {message}")
        self.setting = setting
        self.detail = message


class ImageError(ClipsearchError):
    """An image could not be decoded safely.

    `reason` is a stable code: truncated, not_an_image, too_large, unsupported_format,
    empty, unreadable, decode_failed.
    """

    code = "bad_image"

    def __init__(self, reason: str, detail: str, path: str | None = None) -> None:
        where = f"{path}: " if path else ""
        super().__init__(f"{where}{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.path = path


class WeightsUnavailable(ClipsearchError):
    """The model weights are neither cached nor downloadable; the message says what to do."""

    code = "weights_unavailable"


class ExportUnusable(WeightsUnavailable):
    """A model's ONNX export cannot be used: a file is missing, differs from its manifest, or
    ONNX Runtime cannot load it, or a new export does not match torch. `path` names it."""

    code = "export_unusable"

    def __init__(self, path: str, problem: str, advice: str) -> None:
        super().__init__(f"The ONNX export in {path} cannot be used: {problem}. {advice}")
        self.path = path
        self.problem = problem


class DeviceUnavailable(ClipsearchError):
    """The device the settings name (CLIPSEARCH_DEVICE or --device) is not on this machine;
    `setting` names where it was set."""

    code = "device_unavailable"

    def __init__(self, setting: str, device: str, reason: str) -> None:
        given = f"{setting} {device}" if setting.startswith("--") else f"{setting}={device}"
        super().__init__(
            f"{given}: {reason}. Use cpu, or auto to run on a GPU only where there is one."
        )
        self.setting = setting
        self.device = device
        self.reason = reason


class ModelMismatch(ClipsearchError):
    """The configured model is not the one the index was built with."""

    code = "model_mismatch"

    def __init__(self, configured: str, indexed: str) -> None:
        super().__init__(
            f"The configured model ({configured}) differs from the model the index was "
            f"built with ({indexed}). Leave out --model and --pretrained (and CLIPSEARCH_MODEL, "
            "CLIPSEARCH_PRETRAINED) to use the index's own model, or re-index into a new "
            "index directory and database to switch models."
        )
        self.configured = configured
        self.indexed = indexed


class IndexLocked(ClipsearchError):
    """Another indexer holds the single-writer lock."""

    code = "index_locked"

    def __init__(self, lock_path: str, holder: str) -> None:
        super().__init__(
            f"Another indexer is already running ({holder}); lock file {lock_path}. "
            "Wait for it to finish; the lock is released automatically when it exits."
        )
        self.lock_path = lock_path
        self.holder = holder


class NotFound(ClipsearchError):
    """A thing that was asked for by id or name does not exist."""

    code = "not_found"


class LabelSetError(ClipsearchError):
    """A label set definition cannot be used; `source` names the file or the set."""

    code = "bad_label_set"

    def __init__(self, source: str, message: str) -> None:
        super().__init__(f"{source}: {message}")
        self.source = source
        self.detail = message


class TooManyPrompts(LabelSetError):
    """A label set needs more prompts (labels x templates, synonyms and own prompts counted)
    than a limit allows; `setting` names the environment variable that sets the limit."""

    code = "too_many_prompts"

    def __init__(self, source: str, count: int, limit: int, setting: str, advice: str = "") -> None:
        super().__init__(
            source,
            f"{count} prompts to encode (labels x templates, synonyms and own prompts "
            f"counted); the limit is {limit} ({setting}){advice}",
        )
        self.count = count
        self.limit = limit
        self.setting = setting


class CorruptShard(ClipsearchError):
    """A shard's files do not match its shard.json (size, checksum or count).

    `shard_id` and `problem` (what is wrong, without the shard's name) are set where known.
    """

    code = "corrupt_shard"

    def __init__(
        self, message: str, *, shard_id: str | None = None, problem: str | None = None
    ) -> None:
        super().__init__(message)
        self.shard_id = shard_id
        self.problem = problem


class TrainedTemplateError(ClipsearchError):
    """The trained template of the large-corpus index kind cannot be used: trained for another
    model or dimension, missing, or differing from its checksum."""

    code = "trained_template"

    def __init__(self, trained_id: str, problem: str) -> None:
        super().__init__(
            f"trained template {trained_id} cannot be used: {problem}. Train a new one with "
            "`clipsearch compact --kind ivfpq-large --retrain`"
        )
        self.trained_id = trained_id
        self.problem = problem


class EmptyIndex(ClipsearchError):
    """A search was asked of an index that has no vectors yet."""

    code = "empty_index"


class NoCatalog(EmptyIndex):
    """The database (or the data dir) holds no clipsearch catalog: nothing was indexed there, or
    the URL names another application's database. `advice` says what to do."""

    code = "no_catalog"

    def __init__(self, url: str, advice: str = "run `clipsearch index ROOT` to create one") -> None:
        super().__init__(f"no clipsearch catalog in {url}; {advice}")
        self.url = url
        self.advice = advice


class CatalogSchemaMismatch(ClipsearchError):
    """The catalog's schema revision is not the one this clipsearch reads: older (it needs
    `clipsearch db upgrade`) or unknown (written by a newer clipsearch)."""

    code = "catalog_schema"

    def __init__(self, url: str, revision: str | None, expected: str, *, newer: bool) -> None:
        if newer:
            message = (
                f"the catalog in {url} is at schema revision {revision}, which this clipsearch "
                f"does not know (it reads {expected}): a newer clipsearch wrote it. Upgrade "
                "clipsearch to use this catalog"
            )
        else:
            message = (
                f"the catalog in {url} is at schema revision {revision or 'none'}, older than "
                f"this clipsearch's {expected}; run `clipsearch db upgrade` (with the same "
                "--data-dir or --database-url) to migrate it"
            )
        super().__init__(message)
        self.url = url
        self.revision = revision
        self.expected = expected
        self.newer = newer


class CatalogUnreadable(ClipsearchError):
    """The catalog database answered with an error (unreachable, locked, damaged, half
    migrated) that no other exception explains."""

    code = "catalog_unreadable"

    def __init__(self, url: str, detail: str) -> None:
        super().__init__(f"the catalog in {url} cannot be read: {detail}")
        self.url = url
        self.detail = detail


class BadQuery(ClipsearchError):
    """A query the service refuses: empty text, k out of range, and so on."""

    code = "bad_query"


class PathNotAllowed(ClipsearchError):
    """A catalog path resolves outside every configured image root (a moved root, a symlink)."""

    code = "path_not_allowed"

    def __init__(self, image_id: int, path: str) -> None:
        super().__init__(f"The file of image {image_id} lies outside the configured roots.")
        self.image_id = image_id
        self.path = path


class TrainingDataError(ClipsearchError):
    """A training or evaluation set cannot be used at all (bad layout, no usable samples)."""

    code = "bad_training_data"

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.detail = message


class CatalogNotEmpty(ClipsearchError):
    """A catalog copy was asked to write into a database that already holds rows."""

    code = "catalog_not_empty"

    def __init__(self, url: str, rows: dict[str, int]) -> None:
        held = ", ".join(f"{table} {count}" for table, count in sorted(rows.items()))
        super().__init__(
            f"The target catalog {url} is not empty ({held} rows). Choose an empty database "
            "or schema, or pass --force to replace its rows with the copied ones."
        )
        self.url = url
        self.rows = rows


class CatalogCopyError(ClipsearchError):
    """A catalog copy cannot go ahead, or did not verify; nothing was committed."""

    code = "catalog_copy_failed"


class CatalogMismatch(ClipsearchError):
    """The catalog and the index directory do not belong together, so neither may be used.

    `reason` is a stable code: catalog_lost (an empty or new catalog beside an index dir that
    holds shards), catalog_removed, catalog_replaced, other_index (the catalog belongs to
    another index dir), index_dir_lost (the catalog's shards are not in the index dir),
    unreadable_identity. Nothing was changed or deleted.
    """

    code = "catalog_mismatch"

    def __init__(self, reason: str, message: str, catalog: str = "", index_dir: str = "") -> None:
        super().__init__(message)
        self.reason = reason
        self.catalog = catalog
        self.index_dir = index_dir


class ClusterError(ClipsearchError):
    """The compute cluster (`--engine ray`) cannot run an index job; nothing was committed.

    `reason` is a stable code: unreachable (no cluster answers at the address), cannot_see (its
    workers cannot read the image files or the index dir), model_too_large (no worker has the
    memory for the model), worker_failed (the encode workers could not start or kept dying).
    """

    code = "cluster_unusable"

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.detail = message


class MixedModels(ModelMismatch):
    """A cluster worker loaded another model than the indexer's driver from the same settings
    (another checkpoint file at the same path on one node, say); nothing was committed."""

    code = "mixed_models"

    def __init__(self, worker: str, driver: str, where: str) -> None:
        ClipsearchError.__init__(
            self,
            f"A Ray worker on {where} loaded another model ({worker}) than this indexer "
            f"({driver}) from the same settings: every node must hold the same weights at the "
            "same path. Nothing was committed.",
        )
        self.configured = worker
        self.indexed = driver
        self.where = where
