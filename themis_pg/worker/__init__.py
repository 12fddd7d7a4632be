"""The worker process: the loop that claims jobs and serves them (see loop.py)."""
