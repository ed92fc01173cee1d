"""report.html in a real browser: headless Chromium decodes every figure and paints a page.

The run folder is written without Ray (:mod:`tests.unit.report.synthetic_run`: a real
scenario, typed records, attack artifacts) and reported as ``leaksim report`` does. CI
installs Chromium (.ci/run); elsewhere the test is skipped when it is not installed.
"""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from simulator.report.html import HTML_FILE

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
BROWSER = next((path for name in BROWSERS if (path := shutil.which(name))), None)
pytestmark = pytest.mark.skipif(
    BROWSER is None,
    reason="Chromium is not installed (apt-get install -y chromium; .ci/run installs it in CI)",
)
DATA_URI = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')

# Injected into a copy of the page (which itself has no script): at the load event, when
# every image has loaded or failed, how many images there are and how many did not decode
# (an image that fails has no natural width), as attributes of <body>.
PROBE = """<script>
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var broken = images.filter(function (i) { return !(i.complete && i.naturalWidth > 0); });
  document.body.setAttribute("data-images", String(images.length));
  document.body.setAttribute("data-broken", String(broken.length));
});
</script>"""


def chromium(profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Headless Chromium with a fresh profile, nothing fetched in the background."""
    assert BROWSER is not None
    command = [
        BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
        f"--user-data-dir={profile}", *args,
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=180)


def decoded_in_browser(page: str, tmp_path: Path, name: str) -> tuple[int, int]:
    """(images, broken images) of ``page`` as Chromium loads it."""
    probe = tmp_path / name
    probe.write_text(page.replace("</body>", PROBE + "</body>"))
    result = chromium(
        tmp_path / f"profile-{name}",
        "--virtual-time-budget=10000",
        "--dump-dom",
        probe.as_uri(),
    )
    body = re.search(r'<body data-images="(\d+)" data-broken="(\d+)"', result.stdout)
    assert body, f"the probe did not run: {result.stderr[-2000:]}"
    return int(body.group(1)), int(body.group(2))


@pytest.fixture(scope="module")
def report(reported_sweep: Path) -> Path:
    return reported_sweep / HTML_FILE


def test_every_embedded_figure_is_a_png(report: Path) -> None:
    encoded = DATA_URI.findall(report.read_text())
    assert len(encoded) >= 8
    for data in encoded:
        image = matplotlib.image.imread(io.BytesIO(base64.b64decode(data)), format="png")
        assert image.shape[0] > 50 and image.shape[1] > 50


def test_chromium_decodes_every_image(report: Path, tmp_path: Path) -> None:
    page = report.read_text()
    expected = len(DATA_URI.findall(page))
    assert decoded_in_browser(page, tmp_path, "page.html") == (expected, 0)
    # The check can fail: a figure whose bytes are not an image is reported broken.
    first = DATA_URI.search(page)
    assert first is not None
    garbage = base64.b64encode(b"not a PNG at all" * 64).decode()
    broken = page.replace(first.group(1), garbage, 1)
    assert decoded_in_browser(broken, tmp_path, "broken.html") == (expected, 1)


def test_chromium_renders_a_page_that_is_not_blank(report: Path, tmp_path: Path) -> None:
    shot = tmp_path / "report.png"
    result = chromium(
        tmp_path / "profile", f"--screenshot={shot}", "--window-size=1280,4000", report.as_uri()
    )
    assert shot.is_file(), result.stderr[-2000:]
    pixels = matplotlib.image.imread(shot)[..., :3]
    assert pixels.shape[:2] == (4000, 1280)
    assert pixels.std() > 0.05  # text, tables and figures, not one flat colour
    dark = (pixels.mean(axis=2) < 0.5).mean()
    assert 0.005 < dark < 0.6
    # Figures are painted too: several rows of the page hold black image backgrounds.
    black_rows = (np.abs(pixels).sum(axis=2) < 0.05).any(axis=1).sum()
    assert black_rows > 200
