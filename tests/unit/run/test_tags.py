"""simulator.run.tags: the run's tag key goes to processes below its anchors, and no other."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from simulator.federation.truth import SealError, fetch_tag_key
from simulator.run.tags import TagKeyService

ASK = (
    "import sys; from simulator.federation.truth import fetch_tag_key; "
    "print(fetch_tag_key(sys.argv[1]).hex())"
)


def ask_from_a_child(service: TagKeyService) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", ASK, service.name], capture_output=True, text=True, timeout=60
    )


def test_the_key_goes_to_a_process_below_an_anchor_only() -> None:
    service = TagKeyService(os.urandom(32))
    try:
        # Nothing trusted yet, and this process is no anchor's descendant: refused.
        with pytest.raises(SealError, match="refused this process"):
            fetch_tag_key(service.name, timeout_s=5)
        assert ask_from_a_child(service).returncode != 0
        # Its children are below this process once it is an anchor; the anchor itself is not.
        service.trust(os.getpid())
        child = ask_from_a_child(service)
        assert child.returncode == 0, child.stderr
        assert child.stdout.strip() == service.key.hex()
        with pytest.raises(SealError, match="refused this process"):
            fetch_tag_key(service.name, timeout_s=5)
    finally:
        service.close()
