"""The worker process of a run: ``python -m simulator.run.worker RUN_DIR --points 0,1 --fd N``.

Started by :class:`simulator.run.supervisor.Supervisor`, never by hand. It reads the scenario
from the run folder (importing its plugin files), runs the given points with
:func:`simulator.run.engine.run_points` (on the Ray head the supervisor started for it, named
in its environment, or the user's cluster) and sends every record, progress
tick and round of reconstructions on file descriptor ``N``; the supervisor scores the rounds
and writes the artifacts (:mod:`simulator.run.seal`). It holds no data folder setting, no
truth key and no tag key: what it needs of the data comes in the handoff file
(:mod:`simulator.run.handoff`), which it deletes once read. Should its
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
from simulator.run.handoff import Handoff
from simulator.run.processes import end_with_parent, set_subreaper
from simulator.run.seal import to_wire
from simulator.scenario import expand


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m simulator.run.worker")
    parser.add_argument("folder", type=Path)
    parser.add_argument("--points", required=True, help="comma-separated point indices")
    parser.add_argument("--fd", type=int, required=True, help="where to send the records")
    parser.add_argument("--parent", type=int, required=True, help="the supervising process")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--cpus", type=int, default=None, help="CPUs of the run's Ray head")
    parser.add_argument("--handoff", type=Path, required=True, help="simulator.run.handoff")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    set_subreaper(True)  # Ray's orphans stay below this process...
    end_with_parent(args.parent)  # ...which kills them all should its parent die
    os.set_inheritable(args.fd, False)  # Ray's processes must not hold the pipe open
    channel = Channel(args.fd)
    try:
        handoff = Handoff.take(args.handoff)  # read and deleted before any plugin is imported
        folder = RunFolder.open(args.folder)
        wanted = {int(index) for index in args.points.split(",")}
        points = [point for point in expand(folder.scenario()) if point.index in wanted]
        handoff.serve(points)
        channel.send("ready", os.getpid())
        run_points(
            points,
            channel.record,
            lambda point, attacked: channel.send("refereed", to_wire(point, attacked)),
            handoff,
            lambda point, server_round: channel.progress(point.index, server_round),
            args.verbose,
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
