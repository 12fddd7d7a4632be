"""The worker's side of the job bus: named queries, claim/finish/heartbeat, the listener.

The caller's side runs inside PostgreSQL and lives in ``themis_pg.pl.bus``.
"""
