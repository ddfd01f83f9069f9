"""`python -m app`: serve on 0.0.0.0:$PORT (default 8000) until SIGTERM."""

import logging
import os

from aiohttp import web

from .main import make_app

logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO"), format="%(asctime)s %(levelname)s %(name)s %(message)s")
web.run_app(make_app(), host=os.environ.get("HOST", "0.0.0.0"), port=int(os.environ.get("PORT", "8000")), print=None)
