"""The LoRA registry (``themis.lora_adapters``) and each worker's local cache of adapter files.

Registration validates the file against the base model's GGUF (adapter_file.py) and stores
the row and the file's bytes (``themis.lora_adapter_chunks``, 1 MiB per row) in one
transaction: a file that fails validation leaves nothing behind.  A worker gets an adapter
by sha256: from its cache folder when the file is there, else from the database (written to
a temporary file, its sha256 checked, then renamed into place), and it keeps the folder under
a size budget by removing the least recently used files first.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from psycopg.rows import dict_row

from themis_pg.errors import AdapterNotFound, InvalidAdapter, InvalidInput
from themis_pg.lora.adapter_file import validate_adapter
from themis_pg.models import verify_registered_model
from themis_pg.models.registry import get_model
from themis_pg.pl.lora_registry import CHUNK  # the SQL function writes the same chunks

__all__ = ["AdapterCache", "AdapterRecord", "get_adapter", "list_adapters",
           "register_adapter", "remove_adapter"]

log = logging.getLogger(__name__)

_COLUMNS = ("id, name, domain, base_model, rank, alpha, default_scale, description, sha256, "
            "size_bytes, centroid IS NOT NULL AS has_centroid, created_at")


@dataclass(frozen=True)
class AdapterRecord:
    id: int
    name: str
    domain: str | None
    base_model: str
    rank: int
    alpha: float
    default_scale: float
    description: str
    sha256: str
    size_bytes: int
    has_centroid: bool
    created_at: datetime


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def register_adapter(conn: psycopg.Connection[Any], path: Path, name: str, *,
                     cache_dir: Path, domain: str | None = None, description: str = "",
                     base_model: str | None = None, default_scale: float = 1.0,
                     centroid: np.ndarray | None = None) -> AdapterRecord:
    """Validate ``path`` against the base model (default: the default generation model) and
    store it as ``name``.  ``centroid`` is the embedding that automatic selection compares
    queries with (from the description and example texts)."""
    if not 0.0 <= default_scale <= 16.0 or not np.isfinite(default_scale):
        raise InvalidInput(f"default_scale must be between 0 and 16, not {default_scale}")
    model = get_model(conn, "generation", base_model)
    info = validate_adapter(path, verify_registered_model(model, cache_dir=cache_dir))
    size = path.stat().st_size
    digest = _sha256(path)
    with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        try:
            cur.execute(
                f"INSERT INTO themis.lora_adapters (name, domain, base_model, rank, alpha, "
                f"default_scale, description, sha256, size_bytes, centroid) VALUES "
                f"(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s::vector) RETURNING {_COLUMNS}",
                (name, domain, model.name, info.rank, info.alpha, default_scale, description,
                 digest, size, None if centroid is None else
                 "[" + ",".join(f"{x:.7g}" for x in centroid) + "]"))
        except psycopg.errors.UniqueViolation as exc:
            raise InvalidInput(f"an adapter named {name!r} is already registered",
                               hint="Remove it first (`themis lora remove NAME`).") from exc
        except psycopg.errors.CheckViolation as exc:
            raise InvalidInput(f"invalid adapter name {name!r} (letters, digits and ._:+- "
                               "only, at most 128)") from exc
        row = cur.fetchone()
        assert row is not None
        with open(path, "rb") as f, cur.copy(
                "COPY themis.lora_adapter_chunks (adapter_id, seq, data) FROM STDIN") as copy:
            for seq, block in enumerate(iter(lambda: f.read(CHUNK), b"")):
                copy.write_row((row["id"], seq, block))
    log.info("registered LoRA adapter %s (%s, rank %d, %d bytes, for %s)", name, digest[:12],
             info.rank, size, model.name)
    return AdapterRecord(**row)


def list_adapters(conn: psycopg.Connection[Any]) -> list[AdapterRecord]:
    """The adapters the connected role may see, by name."""
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(f"SELECT {_COLUMNS} FROM themis.lora_adapters ORDER BY name")
        return [AdapterRecord(**r) for r in rows]


def get_adapter(conn: psycopg.Connection[Any], name: str) -> AdapterRecord:
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(f"SELECT {_COLUMNS} FROM themis.lora_adapters WHERE name = %s",
                          (name,)).fetchone()
    if row is None:
        raise AdapterNotFound(f"no LoRA adapter named {name!r}",
                              hint="`themis lora list` shows the registered ones.")
    return AdapterRecord(**row)


def remove_adapter(conn: psycopg.Connection[Any], name: str) -> None:
    with conn.transaction():
        gone = conn.execute("DELETE FROM themis.lora_adapters WHERE name = %s", (name,)).rowcount
    if not gone:
        raise AdapterNotFound(f"no LoRA adapter named {name!r}")


class AdapterCache:
    """A worker's folder of adapter files named by sha256, kept under ``budget`` bytes."""

    def __init__(self, folder: Path, budget: int) -> None:
        self.folder = folder
        self.budget = budget
        folder.mkdir(parents=True, exist_ok=True)

    def path(self, conn: psycopg.Connection[Any], sha256: str) -> Path:
        """The local file of the adapter with this sha256, fetched from the database when
        this cache does not hold it."""
        target = self.folder / f"{sha256}.gguf"
        if target.exists():
            os.utime(target)  # most recently used
            return target
        self._fetch(conn, sha256, target)
        self._evict(keep=target)
        return target

    def _fetch(self, conn: psycopg.Connection[Any], sha256: str, target: Path) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".fetch-")
        h = hashlib.sha256()
        try:
            # binary: the bytes as they are (text would send bytea as hex, twice the size)
            with os.fdopen(fd, "wb") as out, conn.cursor(binary=True) as cur:
                cur.execute(
                    "SELECT c.data FROM themis.lora_adapters a "
                    "JOIN themis.lora_adapter_chunks c ON c.adapter_id = a.id "
                    "WHERE a.id = (SELECT min(id) FROM themis.lora_adapters WHERE sha256 = %s) "
                    "ORDER BY c.seq", (sha256,))
                n = 0
                for (block,) in cur:
                    out.write(block)
                    h.update(block)
                    n += 1
            if n == 0:
                raise AdapterNotFound(f"no LoRA adapter with sha256 {sha256} in the database")
            if h.hexdigest() != sha256:
                raise InvalidAdapter(f"the stored bytes of adapter {sha256[:12]} do not match "
                                     f"its sha256 (got {h.hexdigest()[:12]})")
            os.replace(tmp, target)
            log.info("fetched LoRA adapter %s from the database (%d bytes)", sha256[:12],
                     target.stat().st_size)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def _evict(self, keep: Path) -> None:
        files = [p for p in self.folder.glob("*.gguf") if p != keep]
        total = sum(p.stat().st_size for p in files) + keep.stat().st_size
        for p in sorted(files, key=lambda p: p.stat().st_mtime):
            if total <= self.budget:
                break
            total -= p.stat().st_size
            p.unlink(missing_ok=True)
            log.info("LoRA cache: removed %s (least recently used)", p.name[:12])
