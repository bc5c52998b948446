"""What commands that read an index check before loading a model (a load takes 8-18 s with real
weights): the data dir exists, the index is not empty, and the model is the index's own (taken
from the catalog unless named explicitly)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from indexer.cli.options import open_catalog
from retrieval.config import Settings, load_settings
from retrieval.errors import ConfigError, EmptyIndex, NoCatalog, WeightsUnavailable
from retrieval.models.recorded import ModelChoice, check_before_loading, choose_model, spec_of

if TYPE_CHECKING:
    from retrieval.catalog.database import Catalog
    from retrieval.models.encoder import Encoder

log = logging.getLogger(__name__)

INDEX_HINT = "run `clipsearch index ROOT` to index a folder of pictures"


@dataclass
class Reading:
    """The settings (with the index's model where none was named), the open catalog, and the
    model choice."""

    settings: Settings
    catalog: Catalog
    choice: ModelChoice

    def encoder_factory(self) -> Callable[[], Encoder]:
        return model_loader(self.choice)


def model_loader(choice: ModelChoice) -> Callable[[], Encoder]:
    """Loads the chosen model when called; a failed load of the index's own model says so."""

    def build() -> Encoder:
        from retrieval.models.encoder import encoder_from_settings

        try:
            return encoder_from_settings(choice.settings)
        except WeightsUnavailable as exc:
            raise choice.loading_failed(exc) from None

    return build


def require_data_dir(settings: Settings, from_flag: bool) -> None:
    """ConfigError when the data dir that holds the catalog does not exist: nothing was ever
    indexed there (a typo in --data-dir, or another user's home)."""
    if settings.database_url is not None or settings.data_dir.is_dir():
        return
    where = "--data-dir" if from_flag else "CLIPSEARCH_DATA_DIR"
    raise ConfigError(
        where,
        f"the data dir {settings.data_dir} does not exist, so nothing was indexed there. "
        f"Point {where} at the data dir of your index, or index into this one first: "
        f"clipsearch index ROOT --data-dir {settings.data_dir}",
    )


def open_existing_catalog(settings: Settings) -> Catalog:
    """The settings' catalog, for any command but `index` and `db upgrade`: it must exist, at
    this clipsearch's schema revision. Nothing is created or migrated: NoCatalog (exit 9), a
    lost catalog beside an index (exit 8) or CatalogSchemaMismatch (exit 11) instead."""
    from retrieval.catalog.schema import require_catalog

    catalog = open_catalog(settings)
    try:
        require_catalog(catalog, settings.resolved_index_dir)
    except BaseException:
        catalog.dispose()
        raise
    return catalog


def require_images(catalog: Catalog) -> None:
    """EmptyIndex when the catalog holds no searchable image."""
    if catalog.counts().get("active", 0) == 0:
        raise EmptyIndex(f"the index in {catalog.shown_url} holds no images yet; {INDEX_HINT}")


def open_for_reading(*, need_images: bool, **overrides: Any) -> Reading:
    """Settings, catalog and model for a reading command, with every check that needs no model
    done first."""
    settings = load_settings(**overrides)
    require_data_dir(settings, from_flag=overrides.get("data_dir") is not None)
    catalog = open_existing_catalog(settings)
    if need_images:
        require_images(catalog)
    return Reading(settings, catalog, index_model(settings, catalog))


def index_model(settings: Settings, catalog: Catalog) -> ModelChoice:
    """The index's model where the settings name none explicitly; ModelMismatch before any
    weights are loaded when an explicitly named model cannot be the index's."""
    choice = choose_model(settings, catalog.recorded_model())
    check_before_loading(spec_of(choice.settings), choice.indexed)
    if choice.from_index:
        log.info("using the index's model %s", choice.settings.model)
    return choice


def catalog_may_exist(settings: Settings) -> bool:
    """False when there is certainly no catalog: no database URL and no SQLite file (opening the
    default URL would create one)."""
    return settings.database_url is not None or (settings.data_dir / "catalog.db").is_file()


def existing_index_model(settings: Settings) -> ModelChoice:
    """The index's model where the settings name none, for commands that may also run with no
    index at all (`eval` of a model on a data set): creates no catalog."""
    if not catalog_may_exist(settings):
        return choose_model(settings, None)
    catalog = open_catalog(settings)
    try:
        choice = choose_model(settings, catalog.recorded_model())
    finally:
        catalog.dispose()
    check_before_loading(spec_of(choice.settings), choice.indexed)
    return choice


def warn_if_empty(catalog: Catalog, index_dir: Path) -> None:
    """A line on stderr when there is no catalog yet, or the index is empty: a server may start
    before the first index run (unready until the catalog exists, then it fills). Nothing is
    created; a lost catalog (exit 8) or one at another schema revision (exit 11) is refused."""
    from retrieval.catalog.schema import require_catalog

    if not require_catalog(catalog, index_dir, or_nothing=True):
        typer.echo(
            f"warning: {NoCatalog(catalog.shown_url)}; the server answers 503 (not ready) "
            "until then",
            err=True,
        )
    elif catalog.counts().get("active", 0) == 0:
        typer.echo(
            f"warning: the index in {catalog.shown_url} holds no images yet: searches find "
            "nothing until you run `clipsearch index ROOT`",
            err=True,
        )
