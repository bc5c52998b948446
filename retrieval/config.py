"""One settings class for every process; environment prefix CLIPSEARCH_, validated at start-up."""

from __future__ import annotations

import datetime as dt
import difflib
import functools
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from retrieval.errors import ConfigError

ENV_PREFIX = "CLIPSEARCH_"
# CLIPSEARCH_* variables that are no setting, and so are never warned about: the test suite's,
# the benchmarks' and scripts' (tests/, bench/, scripts/), and the indexer's crash points.
NOT_SETTINGS = frozenset(
    {
        "CLIPSEARCH_TEST_DATABASE_URL",
        "CLIPSEARCH_TEST_MODEL_CACHE",
        "CLIPSEARCH_TEST_RUN",
        "CLIPSEARCH_BENCH_RUN",
        "CLIPSEARCH_CRASH_AT",
        "CLIPSEARCH_CRASH_ONCE",
        "CLIPSEARCH_UPDATE_OPENAPI",
        "CLIPSEARCH_SCHEMATHESIS_EXAMPLES",
        "CLIPSEARCH_SCHEMATHESIS_SEED",
    }
)
IndexKindName = Literal["auto", "flat", "hnsw", "ivf", "ivfpq", "ivfpq-large"]
FaissGpuName = Literal["auto", "on", "off"]


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([smhd])")


def parse_duration(value: str | float) -> float:
    """Seconds from `24h`, `90m`, `1h30m`, `45s`, `2d`, or a plain number of seconds."""
    if isinstance(value, int | float):
        return float(value)
    text = value.strip().lower().replace(" ", "")
    try:
        return float(text)
    except ValueError:
        pass
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(number + unit for number, unit in parts) != text:
        raise ValueError("must be a duration such as 24h, 30m, 1h30m, 45s or 2d")
    return sum(float(number) * _DURATION_UNITS[unit] for number, unit in parts)


def parse_time_of_day(value: str) -> dt.time:
    """`HH:MM` (24-hour clock) as a time."""
    match = re.fullmatch(r"(\d{1,2}):(\d{2})", value.strip())
    if not match or int(match.group(1)) > 23 or int(match.group(2)) > 59:
        raise ValueError("must be a time of day HH:MM, such as 03:00")
    return dt.time(int(match.group(1)), int(match.group(2)))


def normalise_database_url(value: str) -> str:
    """A catalog URL as SQLAlchemy needs it; ValueError unless it is SQLite or Postgres."""
    if value.startswith("postgresql://") or value.startswith("postgres://"):
        # SQLAlchemy would pick psycopg2 for a bare scheme; we ship psycopg 3.
        return "postgresql+psycopg://" + value.split("://", 1)[1]
    if not (value.startswith("sqlite") or value.startswith("postgresql+")):
        raise ValueError("must be a sqlite:/// or postgresql:// URL")
    return value


def _default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "clipsearch"


class Settings(BaseSettings):
    """All configuration. CLI flags are passed as keyword arguments and win over the environment."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="ignore", validate_default=True
    )

    data_dir: Path = Field(default_factory=_default_data_dir)
    database_url: str | None = None
    index_dir: Path | None = None
    model: str = "ViT-B-32"
    pretrained: str = "laion2b_s34b_b79k"
    model_config_dir: Path | None = None
    model_cache_dir: Path | None = None
    device: str = "auto"
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    # Intra-op threads for torch and ONNX Runtime (0: their default, one per core). On a small
    # box shared with the nightly indexer, 1 keeps a query from spinning against the other process.
    torch_threads: int = Field(default=0, ge=0, le=1024)
    # What runs the towers: torch, onnx (ONNX Runtime on an export cached by model identity;
    # `clipsearch export` builds it ahead), tensorrt (ONNX Runtime's TensorRT provider on the
    # same export, a CUDA device), or auto (measured once per machine, per tower).
    runtime: Literal["auto", "torch", "onnx", "tensorrt"] = "torch"
    quantize: Literal["none", "int8"] = "none"  # int8: ONNX Runtime's dynamic int8 weights
    onnx_fallback: Literal["torch", "refuse"] = "torch"  # a corrupt export: run torch, or refuse
    batch_size: int = Field(default=64, ge=1, le=8192)
    workers: int = Field(default_factory=lambda: min(4, os.cpu_count() or 1), ge=0, le=64)
    # Where `clipsearch index` decodes and encodes: `local` (decoder processes and one model
    # here) or `ray` (Ray Data decode tasks and an actor pool of models; clipsearch[ray]).
    engine: Literal["local", "ray"] = "local"
    # The Ray cluster of engine=ray: empty starts one on this machine for the job; else the
    # head's host:port, ray://host:port (Ray Client) or auto (the cluster running here).
    ray_address: str = ""
    roots: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    index_kind: IndexKindName = "auto"
    shard_size: int = Field(default=100_000, ge=1)
    # The large-corpus kind (index_kind ivfpq-large, built by `compact`): vectors per shard, and
    # the shape of its trained template (0: chosen from the corpus when it is trained).
    large_shard_size: int = Field(default=20_000_000, ge=1)
    large_nlist: int = Field(default=0, ge=0, le=1_048_576)
    large_pq_m: int = Field(default=0, ge=0)
    retire_grace_seconds: float = Field(default=600.0, ge=0)
    max_image_pixels: int = Field(default=100_000_000, ge=1)
    # Bytes one image may take while the indexer decodes it (retrieval.images.DecodeCost: the
    # pixels by mode, so float and 16-bit count double or more, the codec's buffer, the RGB
    # result), checked from the header before decoding.
    max_decode_bytes: int = Field(default=1024**3, ge=1024**2)
    # Decode JPEGs at a reduced DCT scale that still covers the model's input size.
    jpeg_draft: bool = True
    # FAISS on the GPU (faiss-gpu build): IVF training and adding, flat/IVF search.
    faiss_gpu: FaissGpuName = "auto"
    hnsw_ef_search: int = Field(default=128, ge=1)
    ivf_nprobe: int = Field(default=32, ge=1)
    # --- zero-shot labels (`clipsearch label`, and after every `clipsearch index`) ---
    # Stored vectors scored per block: memory is about block * (6 * dim + 4 * labels) bytes.
    label_block_size: int = Field(default=16_384, ge=1, le=1_048_576)
    label_on_index: bool = True  # label new images (and relabel changed sets) after indexing
    # --- the HTTP API (`clipsearch serve`) ---
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    # Comma-separated keys. Admin keys also have read access. No keys at all: auth is off.
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    admin_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    max_upload_bytes: int = Field(default=20 * 1024 * 1024, ge=1024)
    max_k: int = Field(default=1000, ge=1, le=100_000)
    max_query_chars: int = Field(default=1000, ge=1, le=100_000)
    reload_interval_seconds: float = Field(default=5.0, ge=0)  # 0: only POST /admin/reload
    query_cache_size: int = Field(default=4096, ge=0)  # text embeddings kept; 0 disables
    microbatch: bool = True
    # How long an IDLE encoder waits for company. 0 (default): start at once; queries that
    # arrive during a pass still share the next one, so batches form under load anyway, and
    # a lone query pays no wait (measured: +5 ms p50 at concurrency 1 with a 5 ms wait).
    microbatch_wait_ms: float = Field(default=0.0, ge=0, le=1000)
    microbatch_max_size: int = Field(default=32, ge=1, le=1024)
    thumbnail_max_side: int = Field(default=512, ge=16, le=2048)
    # --- load limits of the API: what one process holds at most, whatever clients send ---
    # The decode budget of uploads and thumbnails; lower than the indexer's, since a client
    # chooses what the API decodes.
    api_max_decode_bytes: int = Field(default=256 * 1024**2, ge=1024**2)
    max_concurrent_decodes: int = Field(default=2, ge=1, le=256)  # uploads/thumbnails at once
    # Requests served at once (past the health routes), requests waiting for a turn, and how
    # long one may wait; a full queue or a long wait is answered 503 with Retry-After.
    max_concurrent_requests: int = Field(default=32, ge=1, le=10_000)
    max_queued_requests: int = Field(default=64, ge=0, le=100_000)
    queue_timeout_seconds: float = Field(default=10.0, gt=0, le=3600)
    # Against slow clients: the headers of a request, and its whole body, must arrive within
    # these; an idle keep-alive connection is closed after keep_alive_seconds.
    header_timeout_seconds: float = Field(default=10.0, gt=0, le=3600)
    body_timeout_seconds: float = Field(default=60.0, gt=0, le=3600)
    keep_alive_seconds: int = Field(default=5, ge=1, le=3600)
    # Open connections; past it a request gets 503 and its connection is closed. Keep the
    # open-file limit (ulimit -n) above it.
    max_connections: int = Field(default=2048, ge=1, le=1_000_000)
    max_header_bytes: int = Field(default=16 * 1024, ge=1024, le=1024**2)  # larger: 400
    # Prompts (labels x templates, synonyms and own prompts included) one /classify request
    # may have encoded, and that one stored label set may hold.
    classify_max_prompts: int = Field(default=2048, ge=1, le=1_000_000)
    label_set_max_prompts: int = Field(default=200_000, ge=1, le=100_000_000)
    prompt_cache_size: int = Field(default=16_384, ge=0)  # prompt embeddings kept (LRU)
    # Texts waiting for the micro-batcher (queries and prompts); more are refused with 503.
    microbatch_max_pending: int = Field(default=8192, ge=1, le=10_000_000)
    # --- scheduled indexing (`clipsearch schedule`) ---
    index_every: float = Field(default=86_400.0, gt=0)  # seconds; also 24h, 30m, 1h30m
    index_at: str | None = None  # HH:MM local time the runs are aligned to

    @field_validator("roots", mode="before")
    @classmethod
    def _split_roots(cls, value: Any) -> Any:
        # Accept a JSON list or the shell-friendly "dir1:dir2" (os.pathsep) form.
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                import json

                return json.loads(text)
            return [part for part in text.split(os.pathsep) if part]
        return value

    @field_validator("api_keys", "admin_keys", "cors_origins", mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                import json

                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("model")
    @classmethod
    def _check_model(cls, value: str) -> str:
        from retrieval.models.identity import parse_model_name

        try:
            parse_model_name(value)
        except ConfigError as exc:
            raise ValueError(exc.detail) from None
        return value

    @field_validator("index_every", mode="before")
    @classmethod
    def _parse_every(cls, value: Any) -> Any:
        return parse_duration(value) if isinstance(value, str) else value

    @field_validator("index_at")
    @classmethod
    def _check_at(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        return parse_time_of_day(value).strftime("%H:%M")

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
            return value
        raise ValueError("must be auto, cpu, cuda or cuda:N")

    @field_validator("microbatch_max_pending")
    @classmethod
    def _room_for_one_classify(cls, value: int, info: ValidationInfo) -> int:
        prompts = info.data.get("classify_max_prompts")
        if prompts is not None and value < prompts:
            raise ValueError(
                f"must be at least CLIPSEARCH_CLASSIFY_MAX_PROMPTS ({prompts}), "
                "or a /classify at that limit could never be queued"
            )
        return value

    @field_validator("database_url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        return normalise_database_url(value)

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'catalog.db'}"

    @property
    def resolved_index_dir(self) -> Path:
        return self.index_dir or self.data_dir / "index"


def load_settings(**overrides: Any) -> Settings:
    """Build settings from the environment plus explicit overrides (None means "not given").

    Raises ConfigError naming the environment variable of the first bad value.
    """
    given = {key: value for key, value in overrides.items() if value is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else "?"
        setting = ENV_PREFIX + field.upper()
        message = str(first["msg"]).removeprefix("Value error, ")
        raise ConfigError(setting, f"{message} (got {first.get('input')!r})") from None


def setting_variables() -> list[str]:
    """The environment variable of every setting (CLIPSEARCH_MODEL, ...)."""
    return sorted(ENV_PREFIX + name.upper() for name in Settings.model_fields)


def unknown_settings(environ: Mapping[str, str]) -> list[str]:
    """A warning for each CLIPSEARCH_* variable in `environ` that no setting reads, naming the
    nearest setting where one is close (a typo is otherwise ignored without a word)."""
    known = setting_variables()
    suffixes = {name.removeprefix(ENV_PREFIX): name for name in known}
    warnings = []
    for variable in sorted(environ):
        name = variable.upper()  # settings are read whatever the case
        if not name.startswith(ENV_PREFIX) or name in known or name in NOT_SETTINGS:
            continue
        # Compared without the prefix, which every name shares and which would make any two
        # names look alike.
        close = difflib.get_close_matches(name.removeprefix(ENV_PREFIX), list(suffixes), n=1)
        hint = (
            f"did you mean {suffixes[close[0]]}?"
            if close
            else "the settings are listed under Configuration in the README"
        )
        warnings.append(f"{variable} is not a setting and is ignored; {hint}")
    return warnings


@functools.cache
def warn_about_unknown_settings() -> None:
    """Log the unknown CLIPSEARCH_* variables of this process's environment, once a process
    (the command line at start, the API at start-up: `clipsearch serve` is both)."""
    for warning in unknown_settings(os.environ):
        logging.getLogger("clipsearch.settings").warning(warning)
