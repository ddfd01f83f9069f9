"""HTTP and websocket routes."""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import time
import weakref

import psycopg2
from aiohttp import WSCloseCode, WSMsgType, web

from .db import Database
from .metrics import REQUESTS, exposition
from .version import app_version, health_broken

log = logging.getLogger("app")

DB = web.AppKey("db", Database)
COUNTERS = web.AppKey("counters", collections.Counter)
SOCKETS = web.AppKey("sockets", weakref.WeakSet)
MAX_NOTE_BYTES = 10_000


async def in_thread(func, *args, **kwargs):
    return await asyncio.get_running_loop().run_in_executor(None, lambda: func(*args, **kwargs))


async def schema_version(db: Database) -> int:
    """The highest applied migration, 0 when migrations never ran. Raises if the DB is down."""
    row = await in_thread(db.run, "SELECT to_regclass('schema_version') IS NOT NULL AS present", fetch="one")
    if not row["present"]:
        return 0
    row = await in_thread(db.run, "SELECT COALESCE(MAX(version), 0) AS v FROM schema_version", fetch="one")
    return int(row["v"])


async def health(request: web.Request) -> web.Response:
    version = app_version()
    if health_broken():
        return web.json_response({"status": "broken", "version": version, "reason": "BROKEN_HEALTH present"}, status=500)
    try:
        schema = await schema_version(request.app[DB])
    except psycopg2.Error as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return web.json_response({"status": "unavailable", "version": version, "reason": f"database: {reason}"}, status=503)
    return web.json_response({"status": "ok", "version": version, "schema": schema})


def note_json(row) -> dict:
    return {"id": row["id"], "body": row["body"], "created_at": row["created_at"].isoformat()}


async def list_notes(request: web.Request) -> web.Response:
    try:
        limit = max(1, min(int(request.query.get("limit", "100")), 1000))
    except ValueError:
        raise web.HTTPBadRequest(text=json.dumps({"error": "limit must be an integer"}), content_type="application/json") from None
    rows = await in_thread(
        request.app[DB].run, "SELECT id, text AS body, created_at FROM notes ORDER BY id DESC LIMIT %s", (limit,)
    )
    return web.json_response({"notes": [note_json(row) for row in rows]})


async def create_note(request: web.Request) -> web.Response:
    try:
        payload = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        payload = None
    body = payload.get("body") if isinstance(payload, dict) else None
    if not isinstance(body, str) or not body.strip() or len(body.encode()) > MAX_NOTE_BYTES:
        return web.json_response(
            {"error": f'expected JSON {{"body": "<text, 1..{MAX_NOTE_BYTES} bytes>"}}'}, status=400
        )
    row = await in_thread(
        request.app[DB].run,
        "INSERT INTO notes (text) VALUES (%s) RETURNING id, text AS body, created_at",
        (body,),
        fetch="one",
    )
    return web.json_response(note_json(row), status=201)


async def get_note(request: web.Request) -> web.Response:
    try:
        note_id = int(request.match_info["note_id"])
    except ValueError:
        return web.json_response({"error": "note id must be an integer"}, status=400)
    row = await in_thread(
        request.app[DB].run, "SELECT id, text AS body, created_at FROM notes WHERE id = %s", (note_id,), fetch="one"
    )
    if row is None:
        return web.json_response({"error": f"no note {note_id}"}, status=404)
    return web.json_response(note_json(row))


async def websocket(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(heartbeat=30, timeout=5)  # timeout: for the close handshake
    await ws.prepare(request)
    request.app[SOCKETS].add(ws)
    try:
        await ws.send_json({"type": "hello", "version": app_version()})
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                await ws.send_str(msg.data)
            elif msg.type == WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
            elif msg.type == WSMsgType.ERROR:
                log.warning("websocket closed with %s", ws.exception())
    finally:
        request.app[SOCKETS].discard(ws)
    return ws


async def going_away(app: web.Application) -> None:
    """On SIGTERM (a slot being stopped after a cutover): every open websocket gets a
    close frame with 1001 "going away", so clients reconnect (to the new release)
    instead of seeing a reset. In-flight requests finish after this, within
    run_app's shutdown_timeout."""
    sockets = list(app[SOCKETS])
    if sockets:
        log.info("closing %d websocket(s): going away", len(sockets))
    await asyncio.gather(*(ws.close(code=WSCloseCode.GOING_AWAY, message=b"going away") for ws in sockets),
                         return_exceptions=True)


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text format: request counts, request latency, database query time."""
    return web.Response(text=exposition(request.app[COUNTERS]), content_type="text/plain")


@web.middleware
async def count_and_catch(request: web.Request, handler):
    started = time.monotonic()
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        request.app[COUNTERS][f"{exc.status // 100}xx"] += 1
        raise
    except psycopg2.Error as exc:
        log.error("database error on %s %s: %s", request.method, request.path, exc)
        request.app[COUNTERS]["5xx"] += 1
        return web.json_response({"error": "database unavailable"}, status=503)
    finally:
        if request.path not in ("/metrics", "/ws"):  # scrapes and long-lived sockets are not requests served
            REQUESTS.observe(time.monotonic() - started)
    request.app[COUNTERS][f"{response.status // 100}xx"] += 1
    return response


def make_app(database_url: str | None = None) -> web.Application:
    url = database_url or os.environ.get("DATABASE_URL", "")
    app = web.Application(middlewares=[count_and_catch])
    app[DB] = Database(url)
    app[COUNTERS] = collections.Counter()
    app[SOCKETS] = weakref.WeakSet()
    app.on_shutdown.append(going_away)

    async def close_db(app: web.Application) -> None:
        await in_thread(app[DB].close)

    app.on_cleanup.append(close_db)
    app.router.add_get("/health", health)
    app.router.add_get("/api/notes", list_notes)
    app.router.add_post("/api/notes", create_note)
    app.router.add_get("/api/notes/{note_id}", get_note)
    app.router.add_get("/ws", websocket)
    app.router.add_get("/metrics", metrics)
    return app
