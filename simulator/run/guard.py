"""``python -m simulator.run.guard PARENT COMMAND...``: runs COMMAND (a run's Ray head that the
supervising ``leaksim`` process starts, :func:`simulator.run.ray_head.start_head`) and ends
its whole process tree, Ray's daemons and workers included, when PARENT ends, even by SIGKILL.

The worker does as much for what it starts (:mod:`simulator.run.worker`); a head that the
supervising process starts itself (so that its clients, and not the worker, are below a process
it knows: :mod:`simulator.run.tags`) needs the same guard.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence

from simulator.run.processes import end_with_parent, set_subreaper


def main(argv: Sequence[str] | None = None) -> int:
    parent, *command = sys.argv[1:] if argv is None else argv
    set_subreaper(True)  # orphans of the head stay below this process...
    end_with_parent(int(parent))  # ...which kills them all should its parent die
    return subprocess.call(command)


if __name__ == "__main__":
    sys.exit(main())
