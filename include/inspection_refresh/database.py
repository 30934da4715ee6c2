"""The deployment database over any DB-API connection: one statement at a time, and the server's named locks.

Every failure on a connection becomes a :class:`RegistryError` that names the connection (the Airflow
connection id), so a task's log says which one to check. :meth:`Database.named_lock` is ``GET_LOCK``
on a connection of its own: one holder at a time across every host that shares the database (every
Airflow worker changing what is live, :func:`inspection_refresh.compose.artefact_lock`).
:class:`~inspection_refresh.registry.DeploymentRegistry` builds the deployment history on it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager, suppress
from typing import Any, NamedTuple

ARTEFACT_LOCK_WAIT_SECONDS = 300
"""How long a change of what is live waits for another host's (a pointer move, a prune of many objects)."""
LOCK_NAME_LIMIT = 64
"""MySQL/MariaDB named locks have at most 64 characters."""


class RegistryError(RuntimeError):
    """The deployment history could not be read or written (or a named lock taken)."""


def lock_name_for(name: str) -> str:
    """``name`` as a server lock name: itself when it fits, else its start and a sha1 of the whole name."""
    if len(name) <= LOCK_NAME_LIMIT:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()
    return f"{name[:LOCK_NAME_LIMIT - len(digest) - 1]}~{digest}"


class _Done(NamedTuple):
    """What one statement returned."""

    rows: list[dict[str, Any]]
    lastrowid: int
    rowcount: int


class Database:
    """Statements and named locks on the database that ``connect`` opens.

    :param connect: opens a new DB-API connection to the service's database (MySQLdb-like:
        ``%s`` placeholders, ``cursor.lastrowid``).
    :param conn_id: names that connection in messages (the Airflow connection id).
    """

    def __init__(self, connect: Callable[[], Any], conn_id: str) -> None:
        self.connect = connect
        self.conn_id = conn_id

    @contextmanager
    def _connection(self) -> Iterator[Any]:
        """One database connection; any failure on it becomes a :class:`RegistryError` naming the connection."""
        try:
            with closing(self.connect()) as conn:
                yield conn
        except RegistryError:
            raise
        except Exception as exc:
            raise RegistryError(
                f"database connection {self.conn_id!r}: {type(exc).__name__}: {exc}. "
                "Check the connection's host, schema and credentials."
            ) from exc

    @staticmethod
    def _run(conn: Any, sql: str, params: tuple = ()) -> _Done:
        """Run one statement and commit, so the next one sees what other connections committed meanwhile."""
        with closing(conn.cursor()) as cursor:
            cursor.execute(sql, params)
            columns = [c[0] for c in cursor.description] if cursor.description else []
            rows = [dict(zip(columns, row)) for row in cursor.fetchall()] if columns else []
            conn.commit()
            return _Done(rows, int(cursor.lastrowid or 0), int(cursor.rowcount))

    def _execute(self, sql: str, params: tuple = (), *, fetch: bool = False) -> Any:
        """One statement on its own connection: its rows if ``fetch``, else the inserted id."""
        with self._connection() as conn:
            done = self._run(conn, sql, params)
        return done.rows if fetch else done.lastrowid

    @contextmanager
    def _holding(self, conn: Any, name: str, wait_seconds: float, refused: Callable[[], str]) -> Iterator[None]:
        """``GET_LOCK(name)`` on ``conn`` for the block; :class:`RegistryError` with ``refused()`` when not granted."""
        granted = self._run(conn, "SELECT GET_LOCK(%s, %s) AS granted", (name, wait_seconds)).rows[0]
        if granted["granted"] != 1:
            raise RegistryError(refused())
        try:
            yield
        finally:
            with suppress(Exception):  # a broken connection has dropped the lock already
                self._run(conn, "SELECT RELEASE_LOCK(%s)", (name,))

    @contextmanager
    def named_lock(self, name: str, *, wait_seconds: float = ARTEFACT_LOCK_WAIT_SECONDS,
                   purpose: str | None = None) -> Iterator[None]:
        """Hold the database server's named lock ``name`` (``GET_LOCK``) for the block: one holder at a time
        across every host that shares this database, e.g. every Airflow worker changing what is live.

        The lock lives on a connection of its own, opened here and closed after the block, so a
        holder that dies (a killed task) releases it with its connection. Names longer than the
        server's 64 characters are shortened to a prefix and a hash of the whole name. Not
        reentrant: a second ``named_lock`` of the same name inside the block waits for the first.

        :param wait_seconds: how long to wait for another holder before giving up.
        :param purpose: what the lock guards, for the error message (default: the lock's name).
        :raises RegistryError: the lock stayed held elsewhere for ``wait_seconds``, or the database is unreachable.
        """
        lock_name = lock_name_for(name)
        failed: BaseException | None = None
        with self._connection() as conn, self._holding(conn, lock_name, wait_seconds, lambda: (
                f"{purpose or name} stayed locked by another host for {wait_seconds:g}s (database lock "
                f"{lock_name!r} on connection {self.conn_id!r}); try again")):
            try:
                yield
            except BaseException as exc:  # the block's own error: raised as it is, not as a connection error
                failed = exc
        if failed is not None:
            raise failed
