"""Plugin files: whatever a file raises at import is one line naming it, never an exit."""

from __future__ import annotations

from pathlib import Path

import pytest

from simulator.core.fields import InputError
from simulator.scenario.plugins import PluginError, load_plugin


def plugin(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "my_plugin.py"
    path.write_text(body)
    return path


@pytest.mark.parametrize(
    ("body", "said"),
    [
        ("import sys\nsys.exit(0)\n", "SystemExit (the file called sys.exit(0) at import)"),
        ("raise SystemExit('bye')\n", "SystemExit (the file called sys.exit('bye') at import)"),
        ("raise KeyboardInterrupt\n", "KeyboardInterrupt at import"),
        ("raise GeneratorExit('odd')\n", "GeneratorExit: odd"),
        ("class Stop(BaseException):\n    pass\nraise Stop('a\\nb')\n", "Stop: a b"),
        ("raise ValueError('bad\\n  value')\n", "ValueError: bad value"),
    ],
)
def test_anything_a_plugin_raises_at_import_is_one_plugin_error(
    tmp_path: Path, body: str, said: str
) -> None:
    path = plugin(tmp_path, body)
    with pytest.raises(PluginError) as info:
        load_plugin(path)
    message = str(info.value)
    assert message == f"plugin file {str(path)!r}: {said}"
    assert "\n" not in message
    assert isinstance(info.value, InputError)  # the CLI's one line and exit code 2


def test_a_directory_gets_its_own_message(tmp_path: Path) -> None:
    folder = tmp_path / "plugins.py"
    folder.mkdir()
    with pytest.raises(PluginError, match="is a directory; name a Python file"):
        load_plugin(folder)
    with pytest.raises(PluginError, match="does not exist"):
        load_plugin(tmp_path / "missing.py")
