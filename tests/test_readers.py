"""Readers: each format into RawDocuments; bad input fails with IngestError naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from themis_pg.errors import IngestError
from themis_pg.ingest.readers import RawDocument, iter_files, read_file
from themis_pg.resources import sample_corpus_dir


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        path.write_bytes(content)
    return path


def test_plain_text(tmp_path: Path) -> None:
    path = write(tmp_path / "notes.txt", "First line.\n\nSecond paragraph.\n")
    [doc] = read_file(path)
    assert doc == RawDocument(
        str(path.resolve()),
        "First line.\n\nSecond paragraph.\n",
        {"path": "notes.txt", "format": "text"},
    )


def test_uri_is_the_absolute_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "a.txt", "x")
    monkeypatch.chdir(tmp_path)
    [doc] = read_file(Path("a.txt"))
    assert doc.uri == str(tmp_path.resolve() / "a.txt")


def test_markdown_title_is_the_first_heading(tmp_path: Path) -> None:
    text = "```\n# not a heading\n```\n\nIntro.\n\n## Rotating keys ##\n\n# Later\n"
    [doc] = read_file(write(tmp_path / "keys.MD", text))
    assert doc.text == text
    assert doc.metadata == {"path": "keys.MD", "format": "markdown", "title": "Rotating keys"}


def test_markdown_without_heading_has_no_title(tmp_path: Path) -> None:
    [doc] = read_file(write(tmp_path / "plain.md", "Just text."))
    assert "title" not in doc.metadata


def test_bom_is_dropped(tmp_path: Path) -> None:
    [doc] = read_file(write(tmp_path / "bom.txt", b"\xef\xbb\xbfhello"))
    assert doc.text == "hello"


def test_html_text_title_and_structure(tmp_path: Path) -> None:
    html = """<!doctype html><html><head><title> Harborlight   runbook </title>
    <style>body { color: red }</style><script>var secret = "do not index";</script></head>
    <body><nav>Home</nav><h1>Disk full</h1><p>Check <b>df -h</b>
    first.</p><h2>Cleanup</h2><ul><li>Old uploads</li><li>Core dumps</li></ul>
    <p>Line one<br>line two</p><noscript>enable js</noscript></body></html>"""
    [doc] = read_file(write(tmp_path / "page.html", html))
    assert doc.metadata == {"path": "page.html", "format": "html", "title": "Harborlight runbook"}
    assert doc.text == (
        "Home\n\n# Disk full\n\nCheck df -h first.\n\n## Cleanup\n\nOld uploads\n\nCore dumps"
        "\n\nLine one line two"
    )
    assert "secret" not in doc.text and "color" not in doc.text and "enable js" not in doc.text


def test_html_without_title_uses_first_heading(tmp_path: Path) -> None:
    [doc] = read_file(write(tmp_path / "p.htm", "<h2>Only heading</h2><p>Body</p>"))
    assert doc.metadata["title"] == "Only heading"
    assert doc.text == "## Only heading\n\nBody"


def test_jsonl_one_document_per_line(tmp_path: Path) -> None:
    lines = [
        {"content": "first", "title": "One", "metadata": {"team": "web"}},
        {"text": "second, via the text field", "id": "doc-2"},
        {"content": "third", "id": 7},
    ]  # the blank line between the second and third is skipped
    body = "\n".join(json.dumps(x) for x in lines[:2]) + "\n\n" + json.dumps(lines[2]) + "\n"
    path = write(tmp_path / "docs.jsonl", body)
    docs = read_file(path)
    base = str(path.resolve())
    assert [d.uri for d in docs] == [f"{base}#L1", f"{base}#doc-2", f"{base}#7"]
    assert [d.text for d in docs] == ["first", "second, via the text field", "third"]
    assert docs[0].metadata == {
        "path": "docs.jsonl",
        "format": "jsonl",
        "line": 1,
        "team": "web",
        "title": "One",
    }
    assert docs[1].metadata == {"path": "docs.jsonl", "format": "jsonl", "id": "doc-2"}
    assert docs[2].metadata == {"path": "docs.jsonl", "format": "jsonl", "id": 7}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"content": "ok"', "line 2: invalid JSON"),
        ('["a list"]', "line 2: expected a JSON object"),
        ('{"title": "no content"}', 'line 2: needs a string "content"'),
        ('{"content": 5}', 'line 2: needs a string "content"'),
        ('{"content": "x", "metadata": [1]}', 'line 2: "metadata" must be a JSON object'),
        ('{"content": "x", "id": 1.5}', 'line 2: "id" must be a string or an integer'),
        ('{"content": "x", "id": "a"}', "line 2: id 'a' already used on line 1"),
    ],
)
def test_jsonl_bad_line_names_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = write(tmp_path / "bad.jsonl", '{"content": "fine", "id": "a"}\n' + line + "\n")
    with pytest.raises(IngestError) as info:
        read_file(path)
    assert str(path) in str(info.value)
    assert message in str(info.value)


@pytest.mark.parametrize("suffix", [".txt", ".md", ".html", ".jsonl"])
def test_invalid_utf8_names_file_and_byte_offset(tmp_path: Path, suffix: str) -> None:
    path = write(tmp_path / f"latin1{suffix}", "caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(IngestError) as info:
        read_file(path)
    assert str(path) in info.value.message
    assert "byte offset 3" in info.value.message
    assert info.value.sqlstate == "22021"
    # The UnicodeDecodeError is not chained: users see one clear error, not a traceback.
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_invalid_utf8_offset_counts_the_bom(tmp_path: Path) -> None:
    path = write(tmp_path / "bom.txt", b"\xef\xbb\xbfab\xff")
    with pytest.raises(IngestError, match="byte offset 5"):
        read_file(path)


def test_unsupported_extension(tmp_path: Path) -> None:
    path = write(tmp_path / "report.pdf", b"%PDF-1.7")
    with pytest.raises(IngestError, match=r"unsupported file type '\.pdf'") as info:
        read_file(path)
    assert info.value.hint and ".md" in info.value.hint
    with pytest.raises(IngestError, match="no extension"):
        read_file(write(tmp_path / "README", "x"))


def test_directories_are_walked_sorted_skipping_hidden_and_unsupported(tmp_path: Path) -> None:
    for name in [
        "b.md",
        "a.txt",
        "sub/c.html",
        "sub/deeper/d.jsonl",
        "image.png",
        ".hidden.md",
        ".git/config.txt",
        "sub/.cache/e.md",
    ]:
        write(tmp_path / name, "x")
    single = write(tmp_path.parent / f"{tmp_path.name}-single.txt", "y")
    files = list(iter_files([tmp_path, single, tmp_path / "b.md"]))  # b.md only once
    assert [f.relative_to(tmp_path).as_posix() for f in files[:-1]] == [
        "a.txt",
        "b.md",
        "sub/c.html",
        "sub/deeper/d.jsonl",
    ]
    assert files[-1] == single


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(IngestError, match="no such file or directory"):
        list(iter_files([tmp_path / "nope"]))


def test_sample_corpus_reads_cleanly() -> None:
    files = list(iter_files([sample_corpus_dir()]))
    assert 30 <= len(files) <= 40
    for path in files:
        [doc] = read_file(path)
        words = len(doc.text.split())
        assert 150 <= words <= 500, (path.name, words)
        assert doc.metadata["title"], path.name


def test_sample_questions_point_at_their_answers() -> None:
    corpus = sample_corpus_dir()
    lines = (corpus.parent / "sample_questions.jsonl").read_text(encoding="utf-8").splitlines()
    questions = [json.loads(line) for line in lines]
    assert questions[0] == {
        "question": "How do I rotate TLS keys?",
        "source": "tls-certificate-rotation.md",
        "expect": "harborctl tls rotate",
    }
    assert len({q["source"] for q in questions}) >= 12
    for q in questions:
        text = (corpus / q["source"]).read_text(encoding="utf-8")
        assert q["expect"] in text, q
        assert q["question"].lower() not in text.lower()
