"""The check behind ``themis.models.sha256``: a registered model is loaded only while the file on
this machine still has the digest its row was registered with.

Hashing a multi-GB GGUF takes from seconds to minutes, so a successful check is remembered in
``<model cache>/verified.json``, keyed by the file as ``stat`` sees it: path, device, inode,
size, mtime_ns and ctime_ns, together with the digest it was checked against.  A later check of
the same file costs one ``stat`` and one small JSON read.  Why that is safe:

* changing a file's contents changes its ctime (or, when it is replaced by a rename, its
  inode); unlike mtime, ctime cannot be set back with ``utime`` (``cp -p``, ``rsync -t``,
  ``tar`` and ``touch -r`` all can restore mtime);
* file timestamps are only as fine as the kernel's clock tick, so a write in the same tick as
  the ``stat`` could go unseen (git's "racily clean" files): a file changed less than
  ``_SETTLE_S`` seconds before its check is hashed but not remembered;
* a file that changes while it is being hashed is not remembered either;
* re-registering a model with another sha256 finds no entry for that digest and hashes again;
* a mismatch is always decided by a fresh hash, never by the cache.

What it does not guard against: whoever can write the model cache can write ``verified.json``
too, and a file replaced between this check and llama.cpp opening it is not noticed.  The
check catches corrupt, truncated and replaced files, not a hostile local user.

A ``verified.json`` that cannot be written (a worker running as a user without write access to
the cache) only costs a re-hash at the next load; one that cannot be parsed is ignored.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import stat
import tempfile
import time
from pathlib import Path
from typing import Any

from themis_pg.errors import ModelNotFound
from themis_pg.models.fetch import sha256_file
from themis_pg.models.registry import ModelRecord

__all__ = ["VERIFIED_CACHE_NAME", "verify_registered_model"]

log = logging.getLogger(__name__)

VERIFIED_CACHE_NAME = "verified.json"
_CACHE_VERSION = 1
_MAX_ENTRIES = 256
# A file changed less than this long before its check is hashed every time until it settles.
_SETTLE_S = 2.0
# Large files log their hashing progress this often.
_PROGRESS_EVERY_S = 10.0
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_FILE_MODE = 0o644
_IDENTITY_FIELDS = ("dev", "ino", "size", "mtime_ns", "ctime_ns")


def _identity(st: os.stat_result) -> dict[str, int]:
    return {
        "dev": st.st_dev,
        "ino": st.st_ino,
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,
    }


def _read_entries(cache_file: Path) -> dict[str, dict[str, Any]]:
    """The remembered verifications by path; an absent or unreadable file is empty."""
    try:
        data = json.loads(cache_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("ignoring %s, which cannot be read: %s", cache_file, exc)
        return {}
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict) or data.get("version") != _CACHE_VERSION:
        return {}
    return {str(k): v for k, v in files.items() if isinstance(v, dict)}


def _remember(cache_file: Path, path: Path, sha256: str, identity: dict[str, int]) -> None:
    """Record a verified file (newest last, at most ``_MAX_ENTRIES``), atomically by rename.

    Two workers writing at once may lose one entry; that costs a re-hash, nothing more.
    """
    entries = _read_entries(cache_file)
    entries.pop(str(path), None)
    entries[str(path)] = {"sha256": sha256, **identity}
    kept = dict(list(entries.items())[-_MAX_ENTRIES:])
    payload = json.dumps({"version": _CACHE_VERSION, "files": kept}, indent=1) + "\n"
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(
            dir=cache_file.parent, prefix=f".{cache_file.name}.", suffix=".part"
        )
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(payload)
            tmp.chmod(_FILE_MODE)
            os.replace(tmp, cache_file)
        finally:
            tmp.unlink(missing_ok=True)
    except OSError as exc:
        log.warning(
            "cannot record the verification of %s in %s (%s); it will be hashed again at the "
            "next load",
            path,
            cache_file,
            exc,
        )


def _hash(record: ModelRecord, size: int) -> str:
    """sha256 of the model file, logging a line before and after (and progress if slow)."""
    log.info(
        "verifying sha256 of %s model %r (%s, %.1f MiB)",
        record.kind,
        record.name,
        record.path,
        size / (1 << 20),
    )
    started = time.monotonic()
    next_report = started + _PROGRESS_EVERY_S

    def progress(done: int) -> None:
        nonlocal next_report
        now = time.monotonic()
        if now >= next_report and size > 0:
            next_report = now + _PROGRESS_EVERY_S
            log.info("hashed %.0f%% of %s", 100.0 * done / size, record.path)

    digest = sha256_file(record.path, progress)
    log.info("hashed %s in %.1f s", record.path, time.monotonic() - started)
    return digest


def _missing(record: ModelRecord, expected: str | None) -> ModelNotFound:
    return ModelNotFound(
        f"{record.kind} model {record.name!r}: file {record.path} does not exist or is not a "
        f"regular file (registered sha256 {expected or 'none'}, no file to compare)",
        hint="restore the file, or register the model again with its current path "
        "(`themis models register NAME KIND PATH`); for the default models run "
        "`themis models fetch`",
    )


def verify_registered_model(record: ModelRecord, *, cache_dir: Path | None = None) -> Path:
    """Return ``record.path`` once the file there has the sha256 its ``themis.models`` row holds.

    Call it on the record from :func:`~themis_pg.models.registry.get_model` before loading the
    file.  Raises :class:`~themis_pg.errors.ModelNotFound` naming the model, the path and both
    digests when the file is missing, not a regular file, or has another sha256 (and when the
    row's digest is malformed).  The first check of a file hashes it, logged at INFO; a later
    check of the unchanged file is answered from ``verified.json`` in ``cache_dir`` (default:
    the configured model cache, ``THEMIS_MODEL_CACHE``) without reading the file.  A row
    without a sha256 (only a hand-written INSERT makes one: :func:`register_model` always
    records it) is loaded unchecked, with a warning.
    """
    path = record.path
    expected = record.sha256.lower() if record.sha256 else None
    try:
        before = path.stat()
    except OSError:
        raise _missing(record, expected) from None
    if not stat.S_ISREG(before.st_mode):
        raise _missing(record, expected)
    if expected is None:
        log.warning(
            "%s model %r has no sha256 in themis.models; loading %s unchecked",
            record.kind,
            record.name,
            path,
        )
        return path
    if not _SHA256_RE.match(expected):
        raise ModelNotFound(
            f"{record.kind} model {record.name!r}: registered sha256 {record.sha256!r} of "
            f"{path} is not 64 hex digits",
            hint="register the model again (`themis models register NAME KIND PATH`)",
        )

    if cache_dir is None:
        from themis_pg.config import get_settings

        cache_dir = get_settings().model_cache
    cache_file = Path(cache_dir) / VERIFIED_CACHE_NAME
    identity = _identity(before)
    entry = _read_entries(cache_file).get(str(path))
    if (
        entry is not None
        and entry.get("sha256") == expected
        and all(entry.get(k) == identity[k] for k in _IDENTITY_FIELDS)
    ):
        log.debug("%s: sha256 verified earlier and the file is unchanged", path)
        return path

    started_ns = time.time_ns()
    actual = _hash(record, before.st_size)
    if actual != expected:
        raise ModelNotFound(
            f"{record.kind} model {record.name!r}: file {path} has sha256 {actual}, but "
            f"themis.models registered it with sha256 {expected}; the file was changed or "
            "replaced after registration",
            hint="restore the registered file, or, if the new file is intended, register it "
            "again (`themis models register NAME KIND PATH`); for the default models run "
            "`themis models fetch`",
        )
    with contextlib.suppress(OSError):
        after = path.stat()
        settled = max(before.st_mtime_ns, before.st_ctime_ns) < started_ns - _SETTLE_S * 1e9
        if settled and _identity(after) == identity:
            _remember(cache_file, path, expected, identity)
        else:
            log.debug("%s changed recently; its verification is not remembered", path)
    return path
