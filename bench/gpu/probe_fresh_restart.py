"""A warm restart's data path as a freshly started worker pays it: the snapshot file read and
copied to the GPU.  Each variant runs in its own process, so no memory pool is warm:

* ``pinned``: the whole matrix read into ``cupyx.empty_pinned``, then one copy;
* ``pageable``: the whole matrix read into ``np.empty``, then one copy;
* ``staged:T:MB``: ``CupyStore.load_rows`` (what the worker does), T threads with two pinned
  buffers of MB each, the read of one piece overlapping the copy of another.

    python bench/gpu/probe_fresh_restart.py [rows] [dim] [variant ...]
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from themis_pg.retrieval.snapshot import (
    SnapshotMeta,
    read_arrays,
    read_header,
    read_ids,
    write_file,
)

PATH = Path("/tmp/probe_fresh.snapshot")
VARIANTS = ("pinned", "pageable", "staged:4:8", "staged:8:4", "staged:4:16", "staged:2:16",
            "staged:4:8")


def child(kind: str) -> None:
    import cupy as cp
    import cupyx

    from themis_pg.retrieval.cupy_store import CupyStore

    meta = read_header(PATH)
    store = CupyStore(meta.dim)
    warm = cp.ones((2, meta.dim), cp.float32)  # the CUDA context and the elementwise kernels
    warm[1:] = 0  # (compiled once, then from CuPy's disk cache) are not what is timed
    warm.astype(cp.float16)
    cp.cuda.Device(0).synchronize()
    t0 = time.perf_counter()
    if kind.startswith("staged"):
        _, threads, mb = kind.split(":")
        ids, source = read_ids(PATH, meta)
        t1 = time.perf_counter()
        store.load_rows(ids, source, stage_bytes=int(mb) << 20, threads=int(threads))
    else:
        allocate = cupyx.empty_pinned if kind == "pinned" else np.empty
        ids, vectors = read_arrays(PATH, meta, allocate)
        t1 = time.perf_counter()
        store.replace_all(ids, vectors)
    cp.cuda.Device().synchronize()
    t2 = time.perf_counter()
    _, out = store.export()
    ok = np.array_equal(out[:1000], np.fromfile(PATH, np.float32, 1000 * meta.dim,
                                                offset=source_offset(meta)).reshape(1000, -1))
    print(f"| {kind} | {t1 - t0:.3f} | {t2 - t1:.3f} | {t2 - t0:.3f} | {ok} |", flush=True)


def source_offset(meta: SnapshotMeta) -> int:
    return read_ids(PATH, meta)[1].offset


def main() -> None:
    if len(sys.argv) > 1 and not sys.argv[1].isdigit():
        child(sys.argv[1])
        return
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    dim = int(sys.argv[2]) if len(sys.argv) > 2 else 384
    variants = sys.argv[3:] or VARIANTS
    vectors = np.random.default_rng(0).standard_normal((rows, dim), dtype=np.float32)
    meta = SnapshotMeta(token="probe", model="probe", dim=dim, rows=rows, watermark=0,
                        seen={}, pending=[])
    write_file(PATH, meta, np.arange(rows, dtype=np.int64), vectors)
    del vectors
    print(f"fresh process, {rows:,} x {dim} fp32 snapshot in the page cache; read = the file "
          "read (staged: the ids only), to GPU = the rest\n")
    print("| variant | read s | to GPU s | total s | rows match |\n"
          "| --- | ---: | ---: | ---: | --- |")
    for kind in variants:
        subprocess.run([sys.executable, __file__, kind], check=True)
    PATH.unlink()


if __name__ == "__main__":
    main()
