"""themis-pg: retrieval-augmented generation inside PostgreSQL.

The package root stays import-light: the CLI, the worker and the tests import the submodules
they need; nothing heavy (NumPy, llama.cpp) loads from here.
"""

__version__ = "0.1.0"
