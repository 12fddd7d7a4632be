"""The `themis` command line against a real database and worker."""

from __future__ import annotations

import re
import signal
import time

import psycopg

from .helpers import LONG_PROMPT, Call, one, themis, wait_until


def test_status_lists_workers_jobs_models_and_documents(rag_db):
    done = themis("status", dsn=rag_db)
    assert done.returncode == 0, done.stderr
    docs = one(rag_db, "SELECT count(*) FROM themis.documents")
    assert "workers alive: 1" in done.stdout
    assert re.search(rf"documents: {docs} \(0 awaiting embedding\)", done.stdout)
    assert "smollm2-135m-instruct (default)" in done.stdout
    assert "all-minilm-l6-v2" in done.stdout


def test_models_list_marks_defaults(rag_db):
    done = themis("models", "list", dsn=rag_db)
    assert done.returncode == 0, done.stderr
    assert re.search(r"^\* generation\s+smollm2-135m-instruct", done.stdout, re.MULTILINE)


def test_sigterm_hands_unfinished_work_to_the_next_worker(corpus_db, start_worker):
    first = start_worker(corpus_db)
    call = Call(corpus_db, "SELECT themis_generate(%s, 48)", (LONG_PROMPT,))
    call.start()
    job_id = wait_until(lambda: one(corpus_db, "SELECT id FROM themis.jobs WHERE "
                                               "status = 'running'"), 30, "a running job")
    started = time.monotonic()
    first.proc.send_signal(signal.SIGTERM)
    assert first.proc.wait(timeout=30) == 0
    assert time.monotonic() - started < 15
    assert "stopped" in first.log()
    assert one(corpus_db, "SELECT count(*) FROM themis.workers WHERE id = %s", (first.id,)) == 0
    assert one(corpus_db, "SELECT status FROM themis.jobs WHERE id = %s", (job_id,)) == "queued"
    start_worker(corpus_db)
    call.join(timeout=120)
    assert call.error is None, call.error
    with psycopg.connect(corpus_db, autocommit=True) as conn:
        row = conn.execute("SELECT status, attempts FROM themis.jobs WHERE id = %s",
                           (job_id,)).fetchone()
    assert row == ("done", 1), "a clean hand-over must not count as an attempt"


def test_reembed_command_switches_the_corpus_model(migrated_db, tmp_path):
    (tmp_path / "a.md").write_text("# Alpha\n\nThe alpha runbook covers widget restarts.\n")
    assert themis("ingest", "--no-progress", str(tmp_path), dsn=migrated_db).returncode == 0
    done = themis("reembed", "--no-progress", dsn=migrated_db)
    assert done.returncode == 0, done.stderr
    assert "re-embedded 1 documents" in done.stdout
    done = themis("reembed", "--model", "no-such-model", dsn=migrated_db)
    assert done.returncode != 0 and "no-such-model" in done.stderr
    assert "Traceback" not in done.stderr


def test_lora_commands_register_list_show_and_remove(migrated_db, tmp_path):
    done = themis("lora", "demo", str(tmp_path / "adapters"), dsn=migrated_db)
    assert done.returncode == 0, done.stderr
    listed = themis("lora", "list", dsn=migrated_db).stdout
    assert [line.split()[0] for line in listed.splitlines()] == \
        ["demo-cooking", "demo-legal", "demo-medical"]
    shown = themis("lora", "show", "demo-medical", dsn=migrated_db)
    assert '"domain": "medical"' in shown.stdout and '"has_centroid": true' in shown.stdout
    junk = tmp_path / "junk.gguf"
    junk.write_text("not a model")
    bad = themis("lora", "add", str(junk), "--name", "junk", dsn=migrated_db)
    assert bad.returncode != 0 and "not a GGUF file" in bad.stderr
    again = themis("lora", "add", str(tmp_path / "adapters" / "demo-legal.gguf"),
                   "--name", "legal-2", "--domain", "legal", "--example", "Is it binding?",
                   dsn=migrated_db)
    assert again.returncode == 0, again.stderr
    assert themis("lora", "remove", "legal-2", dsn=migrated_db).returncode == 0
    assert one(migrated_db, "SELECT count(*) FROM themis.lora_adapters") == 3
    missing = themis("lora", "remove", "legal-2", dsn=migrated_db)
    assert missing.returncode != 0 and "no LoRA adapter named" in missing.stderr
