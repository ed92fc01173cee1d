"""docs/plugins.md shows real output: the attacks it lists are the ones that ship."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import simulator.run.builtins  # noqa: F401  (registers every built-in attack)
from simulator.core.registry import ATTACKS

ROOT = Path(__file__).resolve().parents[3]


def test_the_unknown_attack_message_shown_lists_every_built_in_attack() -> None:
    text = (ROOT / "docs" / "plugins.md").read_text()
    shown = re.findall(r"known attacks: (\[[^\]]*\])", text)
    assert shown, "docs/plugins.md no longer shows the unknown-attack message"
    # Plugin files loaded by other tests of the same process register attacks too.
    built_in = [n for n in ATTACKS if ATTACKS.entry(n).value.__module__.startswith("attacks.")]
    for listed in shown:
        assert ast.literal_eval(listed) == built_in
