#!/usr/bin/env python3
"""`fab`, plus one line on stderr per release phase: the round trips sent so far.

bench_release.py runs its releases through this instead of `.venv/bin/fab`: the same
program (fabric.main.program, the project's fabfile, the same flags), with
fabfile.release.Run.record wrapped to print `@@phase {"phase": ..., "round_trips": N,
"at": <unix time>}` as each phase is recorded, and two more such lines: `@imported` once
the program is loaded (with the time the script began) and `@exit`. A phase's round trips are the difference to the line before
(the first one includes taking the deploy lock); what follows the last phase (the
release log entry, freeing the lock) is the summary's round_trips minus the last line.
"""

from __future__ import annotations

import time

STARTED = time.time()  # before the imports: what follows is fabric's, invoke's and the fabfile's

import atexit  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

PROJECT_DIR = Path(__file__).resolve().parents[1]
if str(PROJECT_DIR) not in sys.path:
    sys.path.insert(0, str(PROJECT_DIR))

from fabric.main import program  # noqa: E402

from fabfile import release  # noqa: E402  (invoke's loader reuses this module: the wrapper applies)

MARK = "@@phase "
_record = release.Run.record


def record(self, name: str, status: str, seconds: float = 0.0, reason: str = "") -> None:
    _record(self, name, status, seconds, reason)
    mark(name, round_trips=self.ops.round_trips)


def mark(name: str, **extra) -> None:
    print(MARK + json.dumps({"phase": name, "at": time.time(), **extra}), file=sys.stderr, flush=True)


if __name__ == "__main__":  # bench_release.py imports MARK only: no wrapper, no lines in its own process
    release.Run.record = record
    mark("@imported", started=STARTED)
    atexit.register(mark, "@exit")
    sys.exit(program.run())
