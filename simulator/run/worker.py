"""The worker process of a run: ``python -m simulator.run.worker RUN_DIR --points 0,1 --fd N``.

Started by :class:`simulator.run.supervisor.Supervisor`, never by hand. It reads the scenario
from the run folder (importing its plugin files), runs the given points with
:func:`simulator.run.engine.run_points` (each one Ray start) and sends every record and
progress tick on file descriptor ``N``; artifacts it writes to the folder itself. Should its
parent die, even by SIGKILL, it kills its own process tree (Ray's orphans included) and
exits.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import simulator.run.builtins  # noqa: F401  (registers every built-in plugin)
from simulator.run.channel import Channel
from simulator.run.engine import run_points
from simulator.run.folder import RunFolder
from simulator.run.processes import end_with_parent, set_subreaper
from simulator.scenario import expand


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m simulator.run.worker")
    parser.add_argument("folder", type=Path)
    parser.add_argument("--points", required=True, help="comma-separated point indices")
    parser.add_argument("--fd", type=int, required=True, help="where to send the records")
    parser.add_argument("--parent", type=int, required=True, help="the supervising process")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--cpus", type=int, default=None, help="CPUs of the run's Ray head")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    set_subreaper(True)  # Ray's orphans stay below this process...
    end_with_parent(args.parent)  # ...which kills them all should its parent die
    os.set_inheritable(args.fd, False)  # Ray's processes must not hold the pipe open
    channel = Channel(args.fd)
    try:
        folder = RunFolder.open(args.folder)
        wanted = {int(index) for index in args.points.split(",")}
        points = [point for point in expand(folder.scenario()) if point.index in wanted]
        channel.send("ready", os.getpid())
        run_points(
            points,
            channel.record,
            lambda point, server_round: channel.progress(point.index, server_round),
            args.verbose,
            (),
            folder,
            num_cpus=args.cpus,
        )
    except Exception as error:
        channel.error(error)
        return 1
    channel.send("done", True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
