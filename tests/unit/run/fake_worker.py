"""A stand-in for ``simulator.run.worker`` (no Ray, no federation) for the supervisor's tests.

It takes the worker's arguments and acts out the ``plan`` file in the run folder: one word
per start of a worker (``ok``, ``crash``, ``error``, ``hang``, ``together``: wait for a second
worker), consumed in order.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

from simulator.core.records import PointRecord, RoundRecord
from simulator.run.channel import Channel

# Ignores SIGTERM, then says so by writing its PID to the file named by its argument.
SLEEPER = (
    "import os, signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(60)"
)


def main() -> int:
    folder, points = Path(sys.argv[1]), [int(p) for p in sys.argv[3].split(",")]
    channel = Channel(int(sys.argv[5]))
    with open(folder / "plan", "r+") as stream:  # workers of parallel lanes take turns
        fcntl.flock(stream, fcntl.LOCK_EX)
        plan = stream.read().split()
        stream.seek(0)
        stream.truncate()
        stream.write(" ".join(plan[1:]))
    what = plan[0]
    with open(folder / "addresses", "a") as stream:  # the Ray head it was told to join
        stream.write(os.environ.get("LEAKSIM_RAY_ADDRESS", "none") + "\n")
    with open(folder / "wait-policies", "a") as stream:  # how its torch threads would wait
        stream.write(os.environ.get("OMP_WAIT_POLICY", "none") + "\n")
    channel.send("ready", os.getpid())
    if what == "together":  # wait (bounded) until a second worker has started too
        (folder / f"started-{os.getpid()}").write_text("")
        deadline = time.monotonic() + 20
        while len(list(folder.glob("started-*"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        if len(list(folder.glob("started-*"))) < 2:
            channel.error(RuntimeError("the other lane never started"))
            return 1
    for index, point in enumerate(points):
        channel.record(RoundRecord(0, 0.5, 1.0, point=point))
        channel.progress(point, 0)
        if what == "crash" and index == 0:
            os._exit(3)
        if what == "error":
            channel.error(ValueError(f"bad point {point}"))
            return 1
        if what == "hang":
            subprocess.Popen(
                [sys.executable, "-c", SLEEPER, str(folder / "sleeper")], start_new_session=True
            )
            time.sleep(60)
        channel.record(
            PointRecord(
                point=point,
                swept={},
                status="ok",
                rounds_completed=0,
                defense="none",
                strength=None,
                final_accuracy=0.5,
                failed_updates=0,
                seconds=0.1,
            )
        )
    channel.send("done", True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
