"""Answer generation with llama.cpp (the model, the prompt, the engines behind the lane)."""

from __future__ import annotations

import logging
import sys

log = logging.getLogger(__name__)


def load_llama_first() -> None:
    """Load libllama before anything loads NumPy's native libraries.

    Measured on the GPU machine (2026-12-02): the CUDA build of llama.cpp that
    llama-cpp-python 0.3.36 vendors segfaults while setting up a BPE tokenizer in
    ``llama_model_load_from_file`` when NumPy 2.5's extension modules were loaded first, and
    loads the same model cleanly when libllama came first.  Every process that loads a model
    (worker, ingest, benchmarks) calls this before its first NumPy import.
    """
    if "llama_cpp" in sys.modules:
        return
    if "numpy" in sys.modules:
        log.warning("NumPy was loaded before libllama; llama.cpp's CUDA build can crash "
                    "loading a model in this order")
    import llama_cpp  # noqa: F401  (the import loads the shared library)
