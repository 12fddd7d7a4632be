"""The one error type of the server-side package: raised as a PostgreSQL error with this
SQLSTATE by the SQL function that called us."""

from __future__ import annotations


class PLError(Exception):
    def __init__(self, message: str, *, sqlstate: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.sqlstate = sqlstate
        self.hint = hint
