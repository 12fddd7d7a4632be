"""Split a document into retrieval chunks: pure, deterministic, bounded in size.

Structure first, then size: Markdown headings and blank-line paragraphs are the preferred cut
points, then sentence ends, then whitespace, and only a word longer than the whole budget is
cut inside.  Small sections are packed together; a chunk that starts inside a document begins
with the path of headings above it ("Backups > Restoring a snapshot"), because a paragraph
such as "Run it twice" is unfindable without the section that says what "it" is.
Consecutive chunks of one long section share up to ``overlap_chars`` of text, so a sentence
cut at a boundary is still whole in one of them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["chunk_text"]

_HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.+?)(?:[ \t]+#+)?[ \t]*$")
_FENCE = re.compile(r"^ {0,3}(```|~~~)")
# A sentence ends at . ! or ? (optionally followed by a closing quote or bracket) and
# whitespace; the next sentence does not start with a lower-case letter ("e.g. this").
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+(?=[^\sa-z])")
# A line that starts a list item ("- x", "* x", "+ x", "1. x", "2) x"): split before it.
_LIST_ITEM = re.compile(r"\n(?=[ \t]*(?:[-*+]|\d{1,9}[.)])[ \t]+\S)")
_PATH_SEP = " > "


@dataclass(frozen=True)
class _Piece:
    """A unit that is never split further when packing, and how it joins its predecessor."""

    text: str
    sep: str


_Heading = tuple[int, str]  # (level 1-6, title)


def chunk_text(text: str, *, max_chars: int = 1200, overlap_chars: int = 150) -> list[str]:
    """Chunks of ``text``, each at most ``max_chars`` characters and never empty or blank.

    Whole Markdown sections are packed together while they fit (their headings kept inline);
    a chunk that starts inside a document begins with the path of the headings above it.  A
    section too long for one chunk is split by paragraphs, then lines of code or list items,
    then sentences, then words; its chunks all carry its heading path, and consecutive ones
    repeat up to ``overlap_chars`` (less than ``max_chars // 2``) of text, starting at a
    sentence, line or word boundary.  The same input always gives the same output.
    Raises ``ValueError`` on bad limits.
    """
    if max_chars < 16:
        raise ValueError(f"max_chars must be at least 16, got {max_chars}")
    if not 0 <= overlap_chars < max_chars // 2:
        raise ValueError(f"overlap_chars must be in [0, {max_chars // 2}), got {overlap_chars}")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    limit = max_chars // 4  # the most a heading prefix may take of a chunk
    chunks: list[str] = []
    base: list[_Heading] = []  # the heading path that the current chunk's prefix names
    current = ""  # the current chunk's text after its prefix
    last: list[_Heading] = []  # the heading path of the current chunk's last section

    def emit() -> None:
        nonlocal current
        if current.strip():
            chunks.append(_heading_prefix(base, limit) + current)
        current = ""

    for path, body in _sections(text):
        if current and path[: len(base)] == base:
            shared = len(base)  # headings already shown in the chunk are not repeated
            while shared < min(len(last), len(path)) and last[shared] == path[shared]:
                shared += 1
            block = _render_headings(path[shared:]) + body
            if len(_heading_prefix(base, limit)) + len(current) + 2 + len(block) <= max_chars:
                current += "\n\n" + block
                last = path
                continue
        emit()
        # Start a new chunk with this section: its own heading inline, its parents as prefix.
        base, last = path[:-1], path
        block = _render_headings(path[-1:]) + body
        if len(_heading_prefix(base, limit)) + len(block) <= max_chars:
            current = block
            continue
        # Too long for one chunk: split it, every part under the section's full path.
        base = path
        prefix = _heading_prefix(base, limit)
        budget = max_chars - len(prefix)
        chunks.extend(prefix + c for c in _pack(_pieces(body, budget), budget, overlap_chars))
    emit()
    if not chunks and text.strip():
        # Headings and nothing else: the headings themselves are the content.
        titles = "\n\n".join(t for _, t in _headings_only(text))
        chunks = _pack(_pieces(titles, max_chars), max_chars, overlap_chars)
    return chunks


def _render_headings(headings: list[_Heading]) -> str:
    """Markdown heading lines, each followed by a blank line."""
    return "".join(f"{'#' * level} {title}\n\n" for level, title in headings)


def _scan(text: str) -> list[tuple[_Heading | None, str]]:
    """Each line with the heading it is (or None); headings inside code fences are text."""
    lines: list[tuple[_Heading | None, str]] = []
    in_fence = False
    for line in text.split("\n"):
        heading: _Heading | None = None
        if _FENCE.match(line):
            in_fence = not in_fence
        elif not in_fence and (m := _HEADING.match(line)):
            heading = (len(m.group(1)), " ".join(m.group(2).split()))
        lines.append((heading, line))
    return lines


def _headings_only(text: str) -> list[_Heading]:
    return [h for h, _ in _scan(text) if h is not None]


def _sections(text: str) -> list[tuple[list[_Heading], str]]:
    """(heading path, body) of each section with a non-blank body, in order."""
    sections: list[tuple[list[_Heading], str]] = []
    stack: list[_Heading] = []
    lines: list[str] = []

    def close() -> None:
        body = "\n".join(lines).strip("\n")
        if body.strip():
            sections.append((list(stack), body))
        lines.clear()

    for heading, line in _scan(text):
        if heading is None:
            lines.append(line)
            continue
        close()
        while stack and stack[-1][0] >= heading[0]:
            stack.pop()
        stack.append(heading)
    close()
    return sections


def _heading_prefix(headings: list[_Heading], limit: int) -> str:
    """``"A > B\\n\\n"`` for a heading path, shortened to the innermost heading (then cut) to
    stay within ``limit`` chars."""
    if not headings:
        return ""
    path = _PATH_SEP.join(title for _, title in headings)
    if len(path) + 2 > limit:
        path = headings[-1][1]
    if len(path) + 2 > limit:
        path = path[: max(limit - 2, 0)].rstrip()
    return path + "\n\n" if path else ""


def _paragraphs(body: str) -> list[str]:
    """Blank-line-separated paragraphs; a fenced code block stays one paragraph."""
    paragraphs: list[str] = []
    current: list[str] = []
    in_fence = False
    for line in body.split("\n"):
        if _FENCE.match(line):
            in_fence = not in_fence
        if not in_fence and not line.strip():
            if current:
                paragraphs.append("\n".join(current).strip("\n"))
                current = []
            continue
        current.append(line.rstrip())
    if current:
        paragraphs.append("\n".join(current).strip("\n"))
    return [p for p in paragraphs if p.strip()]


def _hard_wrap(text: str, budget: int) -> list[str]:
    """Cut ``text`` into parts of at most ``budget`` chars, at whitespace where possible."""
    parts: list[str] = []
    rest = text.strip()
    while len(rest) > budget:
        cut = rest.rfind(" ", 0, budget + 1)
        if cut <= budget // 2:  # no usable space: cut inside the word
            cut = budget
        parts.append(rest[:cut].rstrip())
        rest = rest[cut:].lstrip()
    if rest:
        parts.append(rest)
    return parts


def _pieces(body: str, budget: int) -> list[_Piece]:
    """Paragraphs that fit whole, else their lines (code) or list items, else sentences,
    else hard-wrapped parts."""
    pieces: list[_Piece] = []
    for paragraph in _paragraphs(body):
        pieces.extend(_split(paragraph, budget, "\n\n"))
    return pieces


def _split(text: str, budget: int, sep: str) -> list[_Piece]:
    """``text`` as pieces of at most ``budget`` chars, the first joined by ``sep``."""
    if len(text) <= budget:
        return [_Piece(text, sep)]
    if _FENCE.match(text):  # code: keep its lines and indentation, cut between lines
        units, joiner = [line.rstrip() for line in text.split("\n")], "\n"
        deeper = False
    elif len(items := _LIST_ITEM.split(text)) > 1:
        units, joiner = items, "\n"
        deeper = True
    else:
        units, joiner = [" ".join(s.split()) for s in _SENTENCE_END.split(text)], " "
        deeper = False
    pieces: list[_Piece] = []
    for unit in units:
        if not unit.strip():
            continue
        if deeper:
            parts = _split(unit.strip(), budget, sep if not pieces else joiner)
        else:
            wrapped = _hard_wrap(unit, budget) if len(unit) > budget else [unit]
            parts = [
                _Piece(w, sep if not pieces and i == 0 else joiner) for i, w in enumerate(wrapped)
            ]
        pieces.extend(parts)
    return pieces


_BOUNDARY = re.compile(r"(?:[.!?][\"')\]]?[ \t]+|\n)")


def _overlap(chunk: str, limit: int) -> str:
    """The end of ``chunk``, at most ``limit`` chars, starting at a sentence or line start if
    there is one in that span, else at a word boundary."""
    if limit <= 0 or len(chunk) <= limit:
        return ""  # a chunk this short would be repeated whole
    tail = chunk[-limit:]
    boundary = _BOUNDARY.search(tail)
    if boundary is not None and tail[boundary.end() :].strip():
        return tail[boundary.end() :].strip()
    if not chunk[-limit - 1].isspace():
        space = re.search(r"\s", tail)
        if space is None:
            return ""
        tail = tail[space.end() :]
    return tail.strip()


def _pack(pieces: list[_Piece], budget: int, overlap_chars: int) -> list[str]:
    """Greedily join pieces into chunks of at most ``budget`` chars, carrying an overlap."""
    chunks: list[str] = []
    current = ""
    for piece in pieces:
        if current and len(current) + len(piece.sep) + len(piece.text) <= budget:
            current += piece.sep + piece.text
            continue
        if current:
            chunks.append(current)
        carried = _overlap(current, overlap_chars)
        if carried and len(carried) + len(piece.sep) + len(piece.text) <= budget:
            current = carried + piece.sep + piece.text
        else:
            current = piece.text
    if current:
        chunks.append(current)
    return chunks
