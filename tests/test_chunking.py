"""chunk_text: bounded, never empty, deterministic, structure-aware, overlapping."""

from __future__ import annotations

import itertools
import random
import re

import pytest

from themis_pg.ingest.chunking import chunk_text

WORDS = [
    "harbor", "light", "registry", "package", "mirror", "backup", "replica", "token", "quota",
    "gateway", "certificate", "rotate", "restore", "vacuum", "index", "cache", "deploy",
    "rollback", "flag", "secret", "audit", "upload",
]  # fmt: skip


def prose(rng: random.Random, sentences: int) -> str:
    out = []
    for _ in range(sentences):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 25))]
        out.append(words[0].capitalize() + " " + " ".join(words[1:]) + ".")
    return " ".join(out)


def markdown(rng: random.Random) -> str:
    parts = ["# Title of the document", prose(rng, 3)]
    for s in range(rng.randint(1, 5)):
        parts.append(f"## Section {s}")
        for _ in range(rng.randint(1, 4)):
            parts.append(prose(rng, rng.randint(1, 12)))
        if rng.random() < 0.5:
            parts.append(f"### Sub {s}")
            parts.append("\n".join(f"- item {i}: {prose(rng, 2)}" for i in range(5)))
        if rng.random() < 0.3:
            parts.append("```\n" + "\n".join(f"    cmd --flag {i}" for i in range(30)) + "\n```")
    return "\n\n".join(parts)


def normalised_words(text: str) -> list[str]:
    return re.sub(r"[#>`]", " ", text).split()


@pytest.mark.parametrize("seed", range(40))
@pytest.mark.parametrize("max_chars,overlap", [(1200, 150), (300, 50), (100, 0), (64, 20)])
def test_chunks_are_bounded_and_not_empty(seed: int, max_chars: int, overlap: int) -> None:
    rng = random.Random(seed)
    text = markdown(rng) if seed % 2 else prose(rng, 60)
    if seed % 5 == 0:
        text += "\n\n" + "x" * (3 * max_chars + 7)  # a word longer than any chunk
    chunks = chunk_text(text, max_chars=max_chars, overlap_chars=overlap)
    assert chunks
    for chunk in chunks:
        assert chunk.strip()
        assert len(chunk) <= max_chars


@pytest.mark.parametrize("seed", range(10))
def test_no_text_is_lost(seed: int) -> None:
    """Every word of the input appears, in order, in the concatenated chunks."""
    rng = random.Random(seed)
    text = markdown(rng)
    chunks = chunk_text(text, max_chars=300, overlap_chars=0)
    joined = normalised_words(" ".join(chunks))
    it = iter(joined)
    missing = [w for w in normalised_words(text) if w not in it]
    assert not missing


def test_deterministic() -> None:
    text = markdown(random.Random(7))
    first = chunk_text(text, max_chars=400, overlap_chars=60)
    assert all(chunk_text(text, max_chars=400, overlap_chars=60) == first for _ in range(5))


def test_empty_and_blank_text_give_no_chunks() -> None:
    assert chunk_text("") == []
    assert chunk_text(" \n\n\t \r\n ") == []


def test_short_document_is_one_chunk_verbatim() -> None:
    text = "# Backups\n\nNightly at 01:15 UTC.\n\n## Restore\n\nUse `harborctl restore`."
    assert chunk_text(text) == [text]


def test_line_endings_do_not_matter() -> None:
    text = markdown(random.Random(3))
    assert chunk_text(text.replace("\n", "\r\n"), max_chars=300, overlap_chars=40) == chunk_text(
        text, max_chars=300, overlap_chars=40
    )


def test_chunks_of_a_long_section_carry_its_heading_path() -> None:
    body = " ".join(f"Sentence number {i} about restoring a snapshot." for i in range(80))
    text = f"# Backups\n\nIntro.\n\n## Restoring a snapshot\n\n{body}\n\n## Retention\n\nShort."
    chunks = chunk_text(text, max_chars=400, overlap_chars=50)
    section = [c for c in chunks if "Sentence number" in c]
    assert len(section) > 3
    assert all(c.startswith("Backups > Restoring a snapshot\n\n") for c in section)
    # The short sections around it stay with their own headings.
    assert chunks[0].startswith("# Backups\n\nIntro.")
    assert chunks[-1] == "Backups\n\n## Retention\n\nShort."


def test_small_sections_are_packed_together() -> None:
    text = "# Doc\n\n" + "\n\n".join(f"## Part {i}\n\nText {i}." for i in range(5))
    chunks = chunk_text(text, max_chars=120, overlap_chars=10)
    assert len(chunks) < 5
    assert "## Part 0" in chunks[0] and "## Part 1" in chunks[0]
    # A chunk that starts inside the document names the document.
    assert all(c.startswith(("# Doc", "Doc\n\n")) for c in chunks)


def test_long_paragraph_splits_at_sentence_ends() -> None:
    sentences = [f"Sentence {i} has a few words in it." for i in range(40)]
    chunks = chunk_text(" ".join(sentences), max_chars=200, overlap_chars=0)
    assert len(chunks) > 1
    for chunk in chunks:
        assert chunk.endswith(".")
        assert chunk.startswith("Sentence")


def test_overlap_repeats_the_end_of_the_previous_chunk() -> None:
    text = " ".join(f"Fact {i} is stated here." for i in range(100))
    chunks = chunk_text(text, max_chars=250, overlap_chars=60)
    assert len(chunks) > 2
    for prev, nxt in itertools.pairwise(chunks):
        shared = max(n for n in range(len(nxt) + 1) if prev.endswith(nxt[:n]))
        assert 0 < shared <= 60  # some overlap, never more than asked
        assert nxt[:shared].startswith("Fact")  # starts at a sentence boundary


def test_zero_overlap_repeats_nothing() -> None:
    text = " ".join(f"Fact {i} is stated here." for i in range(100))
    chunks = chunk_text(text, max_chars=250, overlap_chars=0)
    assert " ".join(chunks) == text


def test_overlong_word_is_cut_into_bounded_parts() -> None:
    word = "".join(chr(ord("a") + i % 26) for i in range(1000))
    chunks = chunk_text(word, max_chars=100, overlap_chars=0)
    assert all(len(c) <= 100 for c in chunks)
    assert "".join(chunks) == word


def test_headings_inside_code_fences_are_not_headings() -> None:
    text = "# Real\n\n```bash\n# just a comment\necho hi\n```\n\nAfter."
    assert chunk_text(text) == [text]
    long_code = (
        "# Real\n\n```\n" + "\n".join(f"# comment {i}\nrun {i}" for i in range(60)) + "\n```"
    )
    chunks = chunk_text(long_code, max_chars=200, overlap_chars=0)
    assert all(c.startswith("Real\n\n") for c in chunks[1:])
    assert all(len(c) <= 200 for c in chunks)
    # Code keeps its lines: no line is glued to the next.
    assert all(
        "run" not in line or line.startswith("run") for c in chunks for line in c.split("\n")
    )


def test_list_items_are_kept_whole_when_a_list_is_split() -> None:
    items = [f"- step {i}: run the command number {i} and wait for it" for i in range(30)]
    chunks = chunk_text("\n".join(items), max_chars=200, overlap_chars=0)
    assert len(chunks) > 1
    for chunk in chunks:
        for line in chunk.split("\n"):
            assert re.fullmatch(r"- step \d+: run the command number \d+ and wait for it", line)


def test_headings_only_document_keeps_its_titles() -> None:
    assert chunk_text("# One\n\n## Two\n") == ["One\n\nTwo"]


def test_long_heading_prefix_is_shortened() -> None:
    title = "A very long title " * 20
    text = f"# {title}\n\n## Short\n\n" + " ".join(f"Word {i} here." for i in range(200))
    chunks = chunk_text(text, max_chars=400, overlap_chars=0)
    assert all(len(c) <= 400 for c in chunks)
    assert all(c.startswith("Short\n\n") for c in chunks)


@pytest.mark.parametrize(("max_chars", "overlap"), [(10, 0), (100, 50), (100, -1), (100, 80)])
def test_bad_limits_are_rejected(max_chars: int, overlap: int) -> None:
    with pytest.raises(ValueError):
        chunk_text("text", max_chars=max_chars, overlap_chars=overlap)
