"""All configuration in one place: ``THEMIS_*`` environment variables, each field described.

Connection parameters follow libpq: ``THEMIS_DSN`` (or ``--dsn``) names the database; when it is
unset the CLI uses the embedded cluster it manages under ``THEMIS_HOME``.  Settings read inside
PostgreSQL (limits, timeouts) live in the ``themis.config`` table instead, so callers cannot
change them with ``SET``.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_home() -> Path:
    """State directory: a system path for root (the server runs as another OS user, who
    cannot enter /root), the XDG data directory otherwise."""
    if os.geteuid() == 0:
        return Path("/var/lib/themis")
    xdg = os.environ.get("XDG_DATA_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "share") / "themis"


def _cache_dir() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "themis"


def _default_model_cache() -> Path:
    return _cache_dir() / "models"


def _default_index_snapshot_dir() -> Path:
    return _cache_dir() / "index"


def _default_lora_cache() -> Path:
    return _cache_dir() / "lora"


class Settings(BaseSettings):
    """Process-wide settings for the CLI and the worker."""

    model_config = SettingsConfigDict(env_prefix="THEMIS_", extra="ignore")

    dsn: str | None = Field(
        default=None,
        description="libpq connection string or URL of the database; unset = embedded cluster.",
    )
    home: Path = Field(
        default_factory=_default_home,
        description="State directory of the embedded cluster (data, socket, logs, pid files).",
    )
    port: int = Field(default=54329, description="Port of the embedded cluster.")
    listen_addresses: str = Field(
        default="",
        description="TCP addresses the embedded cluster listens on ('' = unix socket only).",
    )
    max_connections: int = Field(
        default=300,
        description="max_connections of the embedded cluster: every session that called a "
        "themis function holds a second (bus) connection until it has been idle for 60 s "
        "(idle_session_timeout of role themis_bus), so size it at 2x clients + workers.",
    )
    model_cache: Path = Field(
        default_factory=_default_model_cache,
        description="Where default models are unpacked and converted, keyed by sha256.",
    )
    generation_model: str = Field(
        default="smollm2-135m-instruct",
        description="Name (in themis.models) of the generation model the worker serves; "
        "empty = the default generation model registered there.",
    )
    embedding_model: str = Field(
        default="all-minilm-l6-v2",
        description="Name (in themis.models) of the embedding model for queries and ingest.",
    )
    n_ctx: int = Field(default=4096, description="Context window (tokens) of the generation model.")
    n_threads: int | None = Field(
        default=None,
        description="CPU threads for llama.cpp (None = its default: half the logical CPUs "
        "for generation, all of them for prompt processing).",
    )
    n_gpu_layers: int = Field(
        default=-1, description="Layers offloaded to the GPU when llama.cpp was built with one."
    )
    embedding_flash_attn: bool | None = Field(
        default=None,
        description="Flash attention in the embedding model's forward passes (None: on where "
        "the model runs on the CPU).  Ingest's chunks/s: 1.7x on 2 CPU cores, 0.21x on an "
        "H200; vectors at cosine 1.0000 to those without (bench/ingest_rate.py).",
    )
    ingest_embedders: int = Field(
        default=0, ge=0,
        description="Embedding contexts that `themis ingest` and `themis reembed` run at once "
        "(0: 8 where the embedding model is on a GPU, 1 on a CPU).  H200: 2,701 chunks/s "
        "from 8 contexts against 752 from 1 (bench/ingest_rate.py --parallel); each holds "
        "its own copy of the model.",
    )
    engine: str = Field(
        default="batch",
        description="Generation engine: 'batch' (continuous batching: every running request "
        "in one decode loop, themis_pg/generation/batching.py) or 'sequential' (one request "
        "at a time).",
    )
    max_sequences: int = Field(
        default=8, description="Most requests the batch engine runs at once (more wait).")
    kv_layout: str = Field(
        default="split",
        description="The batch engine's KV cache: 'split' (a stream of n_ctx cells per "
        "sequence: attention reads only its own cells) or 'unified' (one pool shared in "
        "proportion to the tokens held; each token's attention reads every used cell).",
    )
    kv_cells: int = Field(
        default=0,
        description="KV cache cells (tokens) of the batch engine; 0 = n_ctx x (max_sequences "
        "+ 1) split, n_ctx x max_sequences (at most 16,384) unified.",
    )
    kv_type: str = Field(default="f16", description="KV cache cell type: 'f16' or 'q8_0'.")
    batch_tokens: int = Field(
        default=0, ge=0,
        description="Most tokens one step of the batch engine decodes (llama.cpp's n_batch; "
        "n_ubatch, what it computes at once, is this up to 2048); prompts are read in chunks "
        "of this size.  0: 4096 where the generation model is on a GPU (H200, 7B Q4_K_M, 64 "
        "calls: 7.48 requests/s against 7.03 with 2048 in the same run), 512 on a CPU, "
        "where a step of thousands of prompt tokens would hold the generating sequences up "
        "for seconds.",
    )
    memory_budget: str = Field(
        default="",
        description="Most bytes the worker may plan for the matrix, the models and the KV "
        "cache on the device they share (e.g. '40GiB'); '' = 90% of the GPU's memory when "
        "one is used, no limit in host memory (themis_pg/memory.py).",
    )
    index_snapshots: bool = Field(
        default=True,
        description="Keep a local snapshot of the worker's embedding matrix, so a restart "
        "reads only the changes since (the database vouches for each file; see "
        "themis_pg/retrieval/snapshot.py).",
    )
    index_snapshot_dir: Path = Field(
        default_factory=_default_index_snapshot_dir,
        description="Folder of the index snapshots (one file per database, model and device, "
        "about rows x dim x 4 bytes).",
    )
    lora_cache: Path = Field(
        default_factory=_default_lora_cache,
        description="Where a worker keeps the LoRA adapters it fetched from the database, one "
        "file per sha256 (themis_pg/lora/registry.py).",
    )
    max_adapter_sets: int = Field(
        default=4,
        description="Most LoRA adapter sets with a generation engine of their own at once "
        "(each has its own context and KV cache; requests for another set wait).",
    )
    lora_cache_bytes: int = Field(
        default=2 << 30,
        description="Most bytes of adapters kept in the LoRA cache; the least recently used "
        "go first.",
    )
    retrieval_device: str = Field(
        default="auto",
        description="Where the worker keeps the embedding matrix: 'auto' (the GPU when CuPy "
        "sees one, else host memory), 'cpu', or 'cuda' / 'cuda:N'.",
    )
    load_connections: int = Field(
        default=0, ge=0,
        description="Connections a worker reads the embedding matrix over at a cold load; "
        "0 = one per CPU core of the worker's host, at most 16 (bench/load.py: 16 read 1M x "
        "384 fastest on a 16-core host, 32 were slower).",
    )
    worker_id: str | None = Field(
        default=None,
        description="Identity of this worker in themis.workers; must be unique per start "
        "(default host:pid:random, since host:pid repeats across container restarts).",
    )
    poll_interval: float = Field(
        default=1.0,
        description="Seconds between polls of the jobs table; bounds the cost of a lost NOTIFY.",
    )
    heartbeat_interval: float = Field(
        default=2.0, description="Seconds between worker heartbeats (lease renewal, reaping)."
    )
    lease: float = Field(
        default=15.0,
        description="Seconds a claimed job stays leased without a heartbeat before another "
        "worker may take it over.",
    )
    search_batch: int = Field(default=64, description="Most search/embed jobs claimed at once.")
    job_retention: float = Field(
        default=3600.0, description="Seconds finished jobs are kept before the worker prunes them."
    )
    log_level: str = Field(default="INFO", description="Logging level of the CLI and the worker.")

    def worker_identity(self) -> str:
        """A human-readable worker id, unique per start: host:pid:random unless
        THEMIS_WORKER_ID is set.  Finishing a job is fenced on it and the attempt number."""
        return self.worker_id or f"{os.uname().nodename}:{os.getpid()}:{secrets.token_hex(3)}"


def get_settings(**overrides: object) -> Settings:
    """Settings from the environment, with explicit (CLI) overrides applied on top."""
    clean = {k: v for k, v in overrides.items() if v is not None}
    return Settings(**clean)  # type: ignore[arg-type]
