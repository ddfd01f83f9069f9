"""`python -m app`: serve on 0.0.0.0:$PORT (default 8000) until SIGTERM.

On SIGTERM the app stops accepting connections, closes websockets with 1001
"going away" (main.going_away), then lets in-flight requests finish for up to
SHUTDOWN_SECONDS: well inside the compose file's stop_grace_period (20 s).
"""

import logging
import os

from aiohttp import web

from .main import make_app

logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO"), format="%(asctime)s %(levelname)s %(name)s %(message)s")
SHUTDOWN_SECONDS = 10

web.run_app(make_app(), host=os.environ.get("HOST", "0.0.0.0"), port=int(os.environ.get("PORT", "8000")), print=None,
            shutdown_timeout=SHUTDOWN_SECONDS)
