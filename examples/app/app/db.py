"""PostgreSQL access: a small psycopg2 pool used from worker threads."""

from __future__ import annotations

import os
import threading
import time

import psycopg2
import psycopg2.extras
import psycopg2.pool

from .metrics import QUERIES

CONNECT_TIMEOUT = int(os.environ.get("DB_CONNECT_TIMEOUT", "3"))


class Database:
    def __init__(self, url: str, maxconn: int = 5):
        self.url = url
        self.maxconn = maxconn
        self._pool: psycopg2.pool.ThreadedConnectionPool | None = None
        self._lock = threading.Lock()

    def _get_pool(self) -> psycopg2.pool.ThreadedConnectionPool:
        with self._lock:
            if self._pool is None:
                # minconn=0: the app starts (and /health answers 503) while the DB is down
                self._pool = psycopg2.pool.ThreadedConnectionPool(
                    0, self.maxconn, self.url, connect_timeout=CONNECT_TIMEOUT
                )
            return self._pool

    def run(self, sql: str, params: tuple = (), fetch: str = "all"):
        """Execute one statement in its own transaction; return rows as dicts."""
        pool = self._get_pool()
        conn = pool.getconn()
        broken = False
        started = time.monotonic()
        try:
            with conn, conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur:
                cur.execute(sql, params)
                if fetch == "one":
                    return cur.fetchone()
                if fetch == "all":
                    return cur.fetchall()
                return None
        except (psycopg2.OperationalError, psycopg2.InterfaceError):
            broken = True
            raise
        finally:
            QUERIES.observe(time.monotonic() - started)
            pool.putconn(conn, close=broken or conn.closed != 0)

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.closeall()
                self._pool = None
