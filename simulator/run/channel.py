"""The worker's end of the pipe to its supervisor (:mod:`simulator.run.supervisor`).

A module of its own, importing records only, so that a process that sends on the pipe pays
for nothing it does not use (a stand-in worker starts in a fraction of a second, not the
seconds that importing Ray and torch take).
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import traceback
from typing import Any

from simulator.core.records import Record


class Channel:
    """The worker's end of the pipe: one JSON object per line, ``{kind: payload}``."""

    def __init__(self, fd: int) -> None:
        self.stream = os.fdopen(fd, "w", buffering=1)

    def send(self, kind: str, payload: Any) -> None:
        self.stream.write(json.dumps({kind: payload}) + "\n")

    def record(self, record: Record) -> None:
        self.send("record", record.to_dict())

    def progress(self, point: int, server_round: int) -> None:
        self.send("progress", [point, server_round])

    def error(self, error: BaseException) -> None:
        try:
            pickled = base64.b64encode(pickle.dumps(error)).decode()
        except Exception:  # an exception that cannot be pickled travels as text
            pickled = None
        text = "".join(traceback.format_exception(error))
        self.send(
            "error",
            {"type": type(error).__name__, "message": str(error), "pickle": pickled, "trace": text},
        )
