"""Small helpers shared by the database tests."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

from themis_pg.resources import sample_corpus_dir

QUESTIONS_FILE = sample_corpus_dir().parent / "sample_questions.jsonl"
TLS = "How do I rotate TLS keys?"
# SmolLM2 at temperature 0 rambles on this prompt, so max_tokens bounds the run time.
LONG_PROMPT = "Write a very long, detailed story about a lighthouse keeper, chapter by chapter."


def themis(*args: str, dsn: str) -> subprocess.CompletedProcess[str]:
    """Run the real `themis` CLI against ``dsn``."""
    return subprocess.run([sys.executable, "-m", "themis_pg.cli", "--dsn", dsn, *args],
                          capture_output=True, text=True, timeout=300)


def sample_questions() -> list[dict[str, str]]:
    return [json.loads(line) for line in QUESTIONS_FILE.read_text().splitlines() if line.strip()]


def one(dsn: str, sql: str, params: Any = None) -> Any:
    """First column of the first row, on a fresh autocommit connection."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(sql, params).fetchone()
        return None if row is None else row[0]


def sqlstate_of(dsn: str, sql: str, params: Any = None) -> tuple[str | None, str]:
    """Run ``sql`` expecting an error; return (SQLSTATE, message)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        try:
            conn.execute(sql, params)
        except psycopg.Error as exc:
            return exc.sqlstate, str(exc)
    raise AssertionError(f"no error from {sql!r}")


def source_names(rag_json: dict[str, Any]) -> list[str]:
    return [Path(s["source"]).name for s in rag_json["sources"] if s.get("source")]


def wait_until(predicate: Callable[[], Any], timeout: float, what: str,
               interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class Call(threading.Thread):
    """Run one SQL call in a thread on its own connection; keep its result or error."""

    def __init__(self, dsn: str, sql: str, params: Any = None, setup: str | None = None) -> None:
        super().__init__(daemon=True)
        self.dsn, self.sql, self.params, self.setup = dsn, sql, params, setup
        self.result: Any = None
        self.error: psycopg.Error | None = None
        self.pid: int | None = None
        self.elapsed = 0.0
        self.ready = threading.Event()

    def run(self) -> None:
        started = time.monotonic()
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                self.pid = conn.info.backend_pid
                if self.setup:
                    conn.execute(self.setup)
                self.ready.set()
                row = conn.execute(self.sql, self.params).fetchone()
                self.result = None if row is None else row[0]
        except psycopg.Error as exc:
            self.error = exc
        finally:
            self.ready.set()
            self.elapsed = time.monotonic() - started


NEAR_TIE = 0.25  # logits this close may swap when the batch changes how sums are rounded


def same_or_near_tie(alone: tuple[list[int], list[float]],
                     together: tuple[list[int], list[float]]) -> None:
    """The same greedy tokens, or a first divergence where the top two logits were within
    NEAR_TIE of each other in one of the runs (llama.cpp's kernels round by batch shape)."""
    a, b = alone[0], together[0]
    j = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
    if j is None:
        return  # the same tokens (one run may have stopped earlier)
    gap = min(alone[1][j], together[1][j])
    assert gap < NEAR_TIE, (f"outputs diverge at token {j} although its top two logits were "
                            f"{gap:.3f} apart: sequences mixed")


BAD_ADAPTER_CASES = ("not GGUF", "truncated", "not an adapter", "other base model",
                     "wrong shapes", "unknown tensor")


def bad_adapter_files(tmp: Path, good: Path, base: Path, embedding_model: Path
                      ) -> dict[str, Path]:
    """One file per way an adapter can be wrong (BAD_ADAPTER_CASES), made from a good one."""
    import numpy as np

    from themis_pg.lora.adapter_file import base_model_shapes, write_adapter

    out = {}
    out["not GGUF"] = tmp / "notes.gguf"
    out["not GGUF"].write_text("just some text, not a model\n")
    out["truncated"] = tmp / "cut.gguf"
    out["truncated"].write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    out["not an adapter"] = base  # the base model itself: general.type is 'model'
    # an adapter for another model (the embedding model: architecture bert)
    arch, shapes = base_model_shapes(embedding_model)
    name, (n_in, n_out) = next((n, s) for n, s in sorted(shapes.items())
                               if len(s) == 2 and n.endswith("attn_q.weight"))
    out["other base model"] = tmp / "bert.gguf"
    write_adapter(out["other base model"], arch,
                  {name: (np.zeros((4, n_in)), np.zeros((n_out, 4)))}, alpha=4)
    # the right architecture, shapes that do not fit
    _, base_shapes = base_model_shapes(base)
    n_in, n_out = base_shapes["blk.0.attn_q.weight"]
    out["wrong shapes"] = tmp / "shapes.gguf"
    write_adapter(out["wrong shapes"], "llama", {"blk.0.attn_q.weight": (
        np.zeros((4, n_in + 1)), np.zeros((n_out, 4)))}, alpha=4)
    out["unknown tensor"] = tmp / "unknown.gguf"
    write_adapter(out["unknown tensor"], "llama", {"blk.99.attn_q.weight": (
        np.zeros((4, n_in)), np.zeros((n_out, 4)))}, alpha=4)
    return out


def adapter_rows(dsn: str) -> tuple[int, int]:
    """Rows of themis.lora_adapters and of themis.lora_adapter_chunks."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT (SELECT count(*) FROM themis.lora_adapters), "
                           "(SELECT count(*) FROM themis.lora_adapter_chunks)").fetchone()
    assert row is not None
    return int(row[0]), int(row[1])
