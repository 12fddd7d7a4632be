"""Client-side round trips of psycopg connections: a wrapper around ``psycopg.waiting.wait``.

The server sees statements; a client that pipelines (psycopg's ``conn.pipeline()``) sends
several of them in one flight and waits once.  This module counts the waits instead: every
psycopg operation (execute, commit, a pipeline's sync) drives a generator through
``psycopg.waiting.wait``, which yields what it waits for: to write (W), to read (R) or
either (RW).  A round trip is counted each time the client waits *only to read* after it
last sent (or at the start of an operation): a plain statement costs one, a pipeline of
several statements one at its sync (its statements are sent with RW waits that do not block
on the server), a response that arrives in several pieces still one.  Waiting for
notifications (``Connection.notifies``) is not a round trip and is not counted.

Counts are kept per thread name (the worker's threads are named: lanes, housekeeper,
listener) and written, after every counted round trip, as JSON to a file (a template with
``{pid}`` for one file per process).

Two ways in, neither of which touches the project's code:

* the worker: ``python bench/_flights.py OUT_FILE <themis_pg.cli arguments>`` installs the
  counter, then runs ``themis_pg.cli`` as ``python -m themis_pg.cli`` would (the current
  directory first on ``sys.path``);
* the SQL functions' bus connection, inside the server: :func:`sitecustomize_source` is the
  text of a ``sitecustomize.py`` for the server's Python path (the embedded cluster's
  ``pylib``), which every backend that starts PL/Python imports: it installs the counter if
  psycopg imports, with one file per backend.

Standard library only (it also runs in the server's Python, with Debian's psycopg 3.1).
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Generator
from pathlib import Path
from typing import Any

_lock = threading.Lock()
_counts: dict[str, int] = {}
_out: str = ""
_installed = False

WAIT_R = 1  # psycopg's Wait.R / WAIT_R (W is 2, RW is 3) in 3.1 and 3.3 alike


def _record(n: int = 1) -> None:
    name = threading.current_thread().name
    with _lock:
        _counts[name] = _counts.get(name, 0) + n
        snapshot = dict(_counts)
    path = _out.format(pid=os.getpid())
    tmp = f"{path}.tmp{threading.get_ident()}"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump({"pid": os.getpid(), "round_trips": snapshot}, fh)
        os.replace(tmp, path)
    except OSError:
        pass  # counting must never break the program it watches


def _counting(gen: Generator[Any, Any, Any]) -> Generator[Any, Any, Any]:
    waiting_to_read = False
    try:
        state = next(gen)
        while True:
            if int(state) == WAIT_R:
                if not waiting_to_read:
                    waiting_to_read = True
                    _record()
            else:
                waiting_to_read = False
            ready = yield state
            state = gen.send(ready)
    except StopIteration as stop:
        return stop.value


def install(out: str) -> bool:
    """Wrap ``psycopg.waiting.wait``; counts go to ``out`` (``{pid}`` allowed)."""
    global _out, _installed
    if _installed:
        return True
    try:
        import psycopg.waiting as waiting
    except ImportError:
        return False
    original = waiting.wait

    def wait(gen: Any, *args: Any, **kwargs: Any) -> Any:
        name = str(getattr(gen, "__name__", "") or getattr(gen, "__qualname__", ""))
        if "notifies" in name:
            return original(gen, *args, **kwargs)
        return original(_counting(gen), *args, **kwargs)

    waiting.wait = wait
    _out = out
    _installed = True
    return True


def read_counts(paths: list[Path]) -> dict[str, int]:
    """The counts in these files, summed per thread name (missing files count nothing)."""
    total: dict[str, int] = {}
    for path in paths:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        for name, n in data.get("round_trips", {}).items():
            total[name] = total.get(name, 0) + int(n)
    return total


def sitecustomize_source(out_template: str) -> str:
    """A sitecustomize.py that installs this counter in every Python that imports it."""
    marker = "\n# -- " + "main ("  # not spelt out: this line must not match itself
    body = Path(__file__).read_text(encoding="utf-8").split(marker, 1)[0]
    return (f"# Written by bench/_flights.py for a throwaway benchmark cluster.\n{body}\n"
            f"try:\n    install({out_template!r})\nexcept Exception:\n    pass\n")


# -- main (everything above this line is copied into sitecustomize_source) -------------------
def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit("usage: _flights.py OUT_FILE [themis_pg.cli arguments]")
    out = sys.argv[1]
    sys.argv = ["themis", *sys.argv[2:]]
    sys.path[0] = os.getcwd()  # as `python -m` would have it, not this file's folder
    if not install(out):
        raise SystemExit("psycopg is not importable")
    import runpy

    import themis_pg  # say which checkout this process runs (see bench/_setup.code_origin)

    Path(f"{out}.module").write_text(str(Path(themis_pg.__file__).resolve()), encoding="utf-8")

    runpy.run_module("themis_pg.cli", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
