"""Copy a whole catalog into another database (SQLite to Postgres, say), ids kept.

The tables are not listed here: both schemas are migrated to the newest revision and then
reflected, so a table a later migration adds is copied too. Rows go parents first
(foreign-key order), in batches, inside ONE target transaction that also verifies the row
counts: a copy that fails or does not verify leaves the target as it was.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Integer, MetaData, Table, delete, func, insert, select, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.types import DateTime

from retrieval.catalog.database import Catalog
from retrieval.catalog.migrate import current_revision, head_revision
from retrieval.errors import CatalogCopyError, CatalogNotEmpty

# Alembic's own bookkeeping: the target gets its row from its own migration run.
_SKIP_TABLES = frozenset({"alembic_version"})

ProgressCallback = Callable[[str, int, int], None]  # table, rows just copied, total rows


def display_url(url: str) -> str:
    """The URL with any password masked, for messages and logs."""
    return make_url(url).render_as_string(hide_password=True)


@dataclass(frozen=True)
class TableCopy:
    name: str
    rows: int


@dataclass
class CatalogCopyReport:
    source: str
    target: str
    revision: str | None
    tables: list[TableCopy] = field(default_factory=list)
    sequences_reset: list[str] = field(default_factory=list)
    replaced_rows: int = 0  # rows the target held before, deleted under --force
    seconds: float = 0.0

    @property
    def rows(self) -> int:
        return sum(table.rows for table in self.tables)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "target": self.target,
            "revision": self.revision,
            "tables": {table.name: table.rows for table in self.tables},
            "rows": self.rows,
            "sequences_reset": self.sequences_reset,
            "replaced_rows": self.replaced_rows,
            "seconds": round(self.seconds, 3),
        }


def _reflect(connection: Connection) -> dict[str, Table]:
    metadata = MetaData()
    metadata.reflect(bind=connection)
    return {name: table for name, table in metadata.tables.items() if name not in _SKIP_TABLES}


def _fk_order(tables: Mapping[str, Table]) -> list[Table]:
    """Parents before children, so every foreign key points at a row already copied."""
    metadata = next(iter(tables.values())).metadata if tables else MetaData()
    return [table for table in metadata.sorted_tables if table.name in tables]


def _count(connection: Connection, table: Table) -> int:
    return int(connection.execute(select(func.count()).select_from(table)).scalar_one())


def _check_schemas(source: Mapping[str, Table], target: Mapping[str, Table]) -> None:
    only_source = sorted(set(source) - set(target))
    if only_source:
        raise CatalogCopyError(
            f"Tables {', '.join(only_source)} exist in the source catalog but not in the "
            "target's schema; copying would lose them. Are both on the same clipsearch version?"
        )
    for name, table in source.items():
        missing = sorted(set(table.columns.keys()) - set(target[name].columns.keys()))
        if missing:
            raise CatalogCopyError(
                f"Table {name}: columns {', '.join(missing)} exist in the source but not in "
                "the target; copying would lose them."
            )


def _utc(value: Any, aware: bool) -> Any:
    # SQLite keeps timestamps as naive text; clipsearch writes them in UTC. Postgres returns
    # aware values in the session's time zone. Hand on UTC either way: aware for a
    # timestamp-with-time-zone column, naive UTC for any other.
    if not isinstance(value, dt.datetime):
        return value
    utc = value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)
    return utc if aware else utc.replace(tzinfo=None)


def _row_converter(table: Table) -> Callable[[Mapping[Any, Any]], dict[str, Any]]:
    timestamps = {
        c.name: bool(c.type.timezone) for c in table.columns if isinstance(c.type, DateTime)
    }

    def convert(row: Mapping[Any, Any]) -> dict[str, Any]:
        return {
            key: (_utc(v, timestamps[key]) if key in timestamps else v) for key, v in row.items()
        }

    return convert


def _reset_sequences(connection: Connection, tables: list[Table]) -> list[str]:
    """Point each Postgres serial/identity sequence past the copied ids (else: duplicates)."""
    if connection.dialect.name != "postgresql":
        return []  # SQLite's INTEGER PRIMARY KEY continues from max(rowid) by itself
    reset: list[str] = []
    preparer = connection.dialect.identifier_preparer
    for table in tables:
        for column in table.primary_key.columns:
            if not isinstance(column.type, Integer):
                continue
            sequence = connection.execute(
                text("SELECT pg_get_serial_sequence(:table, :column)"),
                {"table": preparer.quote(table.name), "column": column.name},
            ).scalar()
            if sequence is None:
                continue  # ids assigned by the writer (images.id), no sequence to move
            highest = connection.execute(select(func.max(column))).scalar()
            connection.execute(
                text("SELECT setval(:sequence, :value, :called)"),
                {"sequence": sequence, "value": highest or 1, "called": highest is not None},
            )
            reset.append(f"{table.name}.{column.name}")
    return reset


def copy_catalog(
    source: Catalog,
    target: Catalog,
    *,
    force: bool = False,
    batch_size: int = 5000,
    on_progress: ProgressCallback | None = None,
) -> CatalogCopyReport:
    """Copy every catalog table from `source` into `target`, keeping ids.

    The source must be at this clipsearch's schema revision (it is read, never migrated:
    CatalogCopyError otherwise); the target is created or migrated. A target that already
    holds rows is refused (CatalogNotEmpty) unless `force`, which replaces them in the same
    transaction. The caller keeps writers away meanwhile (the CLI holds the indexer lock).
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    if make_url(source.url) == make_url(target.url):
        raise CatalogCopyError("The source and target are the same database.")
    started = time.monotonic()
    found, head = current_revision(source.engine), head_revision()
    if found != head:
        raise CatalogCopyError(
            f"The source catalog is at schema revision {found or 'none'}, not {head}: run "
            "`clipsearch db upgrade` on it first (a copy never migrates its source)."
        )
    target.upgrade()
    report = CatalogCopyReport(
        source=display_url(source.url),
        target=display_url(target.url),
        revision=current_revision(target.engine),
    )
    source_revision = current_revision(source.engine)
    if source_revision != report.revision:
        raise CatalogCopyError(
            f"The source is at schema revision {source_revision}, the target at "
            f"{report.revision}; both should be at the newest after migrating."
        )
    reading = source.engine.connect()
    if reading.dialect.name == "postgresql":
        # One snapshot for every table, so counts and rows agree even if someone writes.
        reading = reading.execution_options(isolation_level="REPEATABLE READ")
    with reading as src, target.engine.begin() as dst:
        source_tables = _reflect(src)
        target_tables = _reflect(dst)
        _check_schemas(source_tables, target_tables)
        order = _fk_order({name: target_tables[name] for name in source_tables})
        expected = {table.name: _count(src, source_tables[table.name]) for table in order}
        counts = {name: _count(dst, table) for name, table in target_tables.items()}
        held = {name: n for name, n in counts.items() if n}
        if held and not force:
            raise CatalogNotEmpty(report.target, held)
        for table in reversed(_fk_order(target_tables)):
            if held.get(table.name):
                dst.execute(delete(table))
        report.replaced_rows = sum(held.values())
        total = sum(expected.values())
        if on_progress and order:
            on_progress(order[0].name, 0, total)  # the total, before the first batch
        for table in order:
            source_table = source_tables[table.name]
            convert = _row_converter(table)
            columns = [
                source_table.c[name] for name in table.columns.keys() if name in source_table.c
            ]
            ordering = list(source_table.primary_key.columns) or columns
            result = src.execution_options(stream_results=True, yield_per=batch_size).execute(
                select(*columns).order_by(*ordering)
            )
            for batch in result.mappings().partitions(batch_size):
                dst.execute(insert(table), [convert(row) for row in batch])
                if on_progress:
                    on_progress(table.name, len(batch), total)
        for table in order:
            copied = _count(dst, table)
            if copied != expected[table.name]:
                raise CatalogCopyError(
                    f"Table {table.name}: {copied} rows in the target after the copy, "
                    f"{expected[table.name]} in the source (was something writing to the "
                    "source?). Nothing was committed."
                )
            report.tables.append(TableCopy(table.name, copied))
        report.sequences_reset = _reset_sequences(dst, order)
    report.seconds = time.monotonic() - started
    return report
