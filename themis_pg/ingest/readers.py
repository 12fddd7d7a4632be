"""Turn files on disk into ``RawDocument``s: one per file, or one per line of a ``.jsonl`` file.

Readers never guess an encoding: a file must be UTF-8 (a leading BOM is allowed), and a file
that is not fails with an ``IngestError`` naming the file and the byte offset, so a user can
find and fix it.  Nothing here touches the database or a model.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from themis_pg.errors import IngestError

__all__ = [
    "SUPPORTED_SUFFIXES",
    "RawDocument",
    "decode_utf8",
    "iter_files",
    "read_documents",
    "read_file",
    "source_uri",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RawDocument:
    """One source's text before chunking.

    ``uri`` identifies the source across runs (``themis.sources.uri``): re-ingesting the same
    uri replaces what it had.  ``metadata`` must be JSON-serialisable.
    """

    uri: str
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)


def source_uri(path: Path) -> str:
    """The uri of a file: its absolute path, so that the same file reached through a relative
    path, another working directory or a symlink is still one source."""
    return str(path.resolve())


def decode_utf8(data: bytes, name: str) -> str:
    """Decode UTF-8 (BOM allowed) or raise ``IngestError`` with the file name and byte offset."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        # With a BOM, utf-8-sig reports offsets after it; make them file offsets again.
        offset = exc.start + (3 if data.startswith(b"\xef\xbb\xbf") else 0)
        raise IngestError(
            f"{name}: not valid UTF-8 at byte offset {offset} ({exc.reason})",
            hint="convert the file to UTF-8, e.g. with iconv -f <encoding> -t utf-8",
        ) from None


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise IngestError(f"{path}: cannot read file: {exc.strerror or exc}") from None
    return decode_utf8(data, str(path))


_ATX_HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(.+?)[ \t#]*$")


def _markdown_title(text: str) -> str | None:
    """The first ATX heading of a Markdown text, if any (code fences are skipped)."""
    in_fence = False
    for line in text.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            in_fence = not in_fence
            continue
        if not in_fence and (m := _ATX_HEADING.match(line)):
            return m.group(1).strip()
    return None


def _read_plain(path: Path) -> list[RawDocument]:
    text = _read_text(path)
    return [RawDocument(source_uri(path), text, {"path": path.name, "format": "text"})]


def _read_markdown(path: Path) -> list[RawDocument]:
    text = _read_text(path)
    meta: dict[str, Any] = {"path": path.name, "format": "markdown"}
    if title := _markdown_title(text):
        meta["title"] = title
    return [RawDocument(source_uri(path), text, meta)]


# Elements whose content is a block of its own: each becomes a paragraph of the text.
_BLOCK_TAGS = (
    "address", "article", "aside", "blockquote", "dd", "details", "div", "dl", "dt",
    "fieldset", "figcaption", "figure", "footer", "form", "header", "hr", "li", "main",
    "nav", "ol", "p", "pre", "section", "summary", "table", "tr", "ul",
)  # fmt: skip
_DROPPED_TAGS = ("script", "style", "noscript", "template", "head", "svg", "iframe")


def html_to_text(html: str) -> tuple[str, str | None]:
    """Visible text of an HTML page, and its title.

    Block elements become blank-line-separated paragraphs and ``<h1>``..``<h6>`` become
    Markdown headings, so the chunker sees the same structure it sees in a Markdown file.
    """
    from bs4 import BeautifulSoup  # imported here: only HTML ingest needs it

    soup = BeautifulSoup(html, "html.parser")
    title = None
    if soup.title is not None:
        title = " ".join(soup.title.get_text().split()) or None
    for tag in soup(_DROPPED_TAGS):
        tag.decompose()
    for br in soup("br"):
        br.replace_with("\n")
    for tag in soup(_BLOCK_TAGS):
        tag.insert_before("\n\n")
        tag.insert_after("\n\n")
    for level in range(1, 7):
        for tag in soup(f"h{level}"):
            tag.insert_before("\n\n" + "#" * level + " ")
            tag.insert_after("\n\n")
    paragraphs = (" ".join(p.split()) for p in re.split(r"\n[ \t\r\f\v]*\n", soup.get_text()))
    text = "\n\n".join(p for p in paragraphs if p)
    if title is None:
        title = _markdown_title(text)
    return text, title


def _read_html(path: Path) -> list[RawDocument]:
    text, title = html_to_text(_read_text(path))
    meta: dict[str, Any] = {"path": path.name, "format": "html"}
    if title:
        meta["title"] = title
    return [RawDocument(source_uri(path), text, meta)]


def _read_jsonl(path: Path) -> list[RawDocument]:
    """One document per non-blank line: ``{"content" | "text": str, "id"?, "title"?,
    "metadata"?: object}``.  The uri is ``<file>#<id>`` when the line has an id (stable when
    lines move), ``<file>#L<line number>`` otherwise."""
    base = source_uri(path)
    docs: list[RawDocument] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}: line {lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise IngestError(f"{where}: invalid JSON ({exc.msg}, column {exc.colno})") from None
        if not isinstance(obj, dict):
            raise IngestError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        content = obj.get("content", obj.get("text"))
        if not isinstance(content, str):
            raise IngestError(f'{where}: needs a string "content" (or "text") field')
        meta: dict[str, Any] = {"path": path.name, "format": "jsonl"}
        extra = obj.get("metadata", {})
        if not isinstance(extra, dict):
            raise IngestError(f'{where}: "metadata" must be a JSON object')
        meta.update(extra)
        title = obj.get("title")
        if title is not None:
            if not isinstance(title, str):
                raise IngestError(f'{where}: "title" must be a string')
            meta["title"] = title
        doc_id = obj.get("id")
        if doc_id is None:
            uri = f"{base}#L{lineno}"
            meta["line"] = lineno  # not for lines with an id: they may move freely
        elif isinstance(doc_id, str | int) and not isinstance(doc_id, bool):
            meta["id"] = doc_id
            uri = f"{base}#{doc_id}"
        else:
            raise IngestError(f'{where}: "id" must be a string or an integer')
        if uri in seen:
            raise IngestError(f"{where}: id {doc_id!r} already used on line {seen[uri]}")
        seen[uri] = lineno
        docs.append(RawDocument(uri, content, meta))
    return docs


_READERS: dict[str, Callable[[Path], list[RawDocument]]] = {
    ".txt": _read_plain,
    ".text": _read_plain,
    ".md": _read_markdown,
    ".markdown": _read_markdown,
    ".html": _read_html,
    ".htm": _read_html,
    ".jsonl": _read_jsonl,
}
SUPPORTED_SUFFIXES: frozenset[str] = frozenset(_READERS)


def read_file(path: Path) -> list[RawDocument]:
    """The documents of one file, chosen by its (case-insensitive) extension.

    Raises ``IngestError`` for an unsupported extension, unreadable file, invalid UTF-8 or a
    malformed ``.jsonl`` line.
    """
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        supported = ", ".join(sorted(SUPPORTED_SUFFIXES))
        raise IngestError(
            f"{path}: unsupported file type {path.suffix or '(no extension)'!r}",
            hint=f"supported: {supported}",
        )
    return reader(path)


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def iter_files(paths: Iterable[Path]) -> Iterator[Path]:
    """Files named by ``paths``, in order; a directory yields its files recursively, sorted,
    skipping hidden files and directories and files of unsupported types (which are logged).

    A file named explicitly is yielded whatever its type, so ``read_file`` can reject it
    loudly; a file reached twice (named and inside a named directory) is yielded once; a
    missing path raises ``IngestError``.
    """
    seen: set[str] = set()
    for path in paths:
        if path.is_dir():
            candidates = [
                child
                for child in sorted(path.rglob("*"))
                if child.is_file() and not _is_hidden(child, path)
            ]
        elif path.is_file():
            candidates = [path]
        else:
            raise IngestError(f"{path}: no such file or directory")
        for child in candidates:
            if child is not path and child.suffix.lower() not in SUPPORTED_SUFFIXES:
                log.info("skipping %s: unsupported file type", child)
                continue
            if (uri := source_uri(child)) not in seen:
                seen.add(uri)
                yield child


def read_documents(paths: Sequence[Path]) -> Iterator[tuple[Path, list[RawDocument]]]:
    """Each file under ``paths`` with its documents, read lazily one file at a time."""
    for path in iter_files(paths):
        yield path, read_file(path)
