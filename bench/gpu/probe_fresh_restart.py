"""A warm restart's data path as a freshly started worker pays it: the snapshot file read into
a new host buffer (pinned by ``cupyx.empty_pinned``, or pageable ``np.empty``), then copied
to the GPU.  Each variant runs in its own process, so no memory pool is warm.

    python bench/gpu/probe_fresh_restart.py [rows] [dim]
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from themis_pg.retrieval.snapshot import SnapshotMeta, read_arrays, read_header, write_file

PATH = Path("/tmp/probe_fresh.snapshot")


def child(kind: str) -> None:
    import cupy as cp
    import cupyx

    cp.cuda.Device(0).synchronize()  # the CUDA context is not what is timed
    allocate = cupyx.empty_pinned if kind == "pinned" else np.empty
    t0 = time.perf_counter()
    meta = read_header(PATH)
    _ids, vectors = read_arrays(PATH, meta, allocate)
    t1 = time.perf_counter()
    dev = cp.empty(vectors.shape, cp.float32)
    dev.set(vectors)
    cp.cuda.Device().synchronize()
    t2 = time.perf_counter()
    print(f"| {kind} | {t1 - t0:.3f} | {t2 - t1:.3f} | {t2 - t0:.3f} |", flush=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("pinned", "pageable"):
        child(sys.argv[1])
        return
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    dim = int(sys.argv[2]) if len(sys.argv) > 2 else 384
    vectors = np.random.default_rng(0).standard_normal((rows, dim), dtype=np.float32)
    meta = SnapshotMeta(token="probe", model="probe", dim=dim, rows=rows, watermark=0,
                        seen={}, pending=[])
    write_file(PATH, meta, np.arange(rows, dtype=np.int64), vectors)
    print(f"fresh process, {rows:,} x {dim} fp32 snapshot in the page cache\n")
    print("| host buffer | read s | to GPU s | total s |\n| --- | ---: | ---: | ---: |")
    for kind in ("pinned", "pageable", "pinned", "pageable"):
        subprocess.run([sys.executable, __file__, kind], check=True)
    PATH.unlink()


if __name__ == "__main__":
    main()
