"""/dashboard in a real browser (Debian's headless `chromium`) after a short load: the
page's own script fetches /dashboard/data and draws every headline plot with data.

Set TANDEM_DASHBOARD_SCREENSHOT=docs/dashboard.png to also save the screenshot there
(that is how the README's picture is made)."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import time
import zlib
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest

from live_support import send_load, system_tool, tandem_server

HEADLINE = ("goodput", "ttft", "itl", "tokens", "requests", "kv_cache")
NOT_YET_EXPORTED = ("kv_bandwidth", "kv_failures", "eplb", "eplb_ranks", "spec_decode",   # no series until pd, EPLB, P-EAGLE,
                    "autoscaling", "autoscaling_slo", "autoscaling_backlog")   # autoscaling run
WINDOW = (1400, 900)
# Headless flags that work in a closed network and as root.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", f"--window-size={WINDOW[0]},{WINDOW[1]}",
         # Run the page's timers and fetches for up to 5 s of virtual time before
         # dumping or capturing, so the first data poll has been drawn.
         "--virtual-time-budget=5000"]


@pytest.fixture(scope="module")
def browser():
    return system_tool("chromium", "chromium", ("/usr/bin/chromium",))


@pytest.fixture(scope="module")
def dashboard_url(browser):   # no model load when the test is going to skip
    if os.environ.get("TANDEM_DASHBOARD_SCREENSHOT"):
        # For the docs: the default SLOs (TTFT 1 s, ITL 100 ms) and a load that ramps up
        # past what two CPU cores serve within them, so goodput parts from request rate.
        with tandem_server(ttft_ms=1000, itl_ms=100) as url:
            for requests, rate, tokens in ((16, 2.0, 16), (30, 5.0, 32), (40, 10.0, 48)):
                send_load(url, requests=requests, rate=rate, max_tokens=tokens)
            time.sleep(5)
            yield f"{url}/dashboard"
        return
    with tandem_server() as url:
        send_load(url, requests=12, rate=4.0)
        # Let the sampler take a few snapshots after the load (it samples every second).
        deadline = time.monotonic() + 30
        while len(httpx.get(f"{url}/dashboard/data").json()["times"]) < 5:
            assert time.monotonic() < deadline, "the dashboard sampler is not sampling"
            time.sleep(0.5)
        yield f"{url}/dashboard"


def chromium(browser: str, tmp_path: Path, url: str, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{time.monotonic_ns()}"
    result = subprocess.run([browser, *FLAGS, f"--user-data-dir={profile}", *args, url],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


class PanelParser(HTMLParser):
    """Collects each <section class="panel">: its data-* attributes and drawn lines."""

    def __init__(self) -> None:
        super().__init__()
        self.panels: dict[str, dict] = {}
        self.body: dict[str, str] = {}
        self._current: dict | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "body":
            self.body = a
        elif tag == "section" and a.get("class") == "panel":
            self._current = {**a, "lines": 0, "texts": []}
            self.panels[a["id"].removeprefix("panel-")] = self._current
        elif tag == "path" and a.get("class") == "series" and self._current is not None:
            self._current["lines"] += 1
            # A drawn line has at least one segment with two points.
            self._current.setdefault("longest", 0)
            self._current["longest"] = max(self._current["longest"], a["d"].count("L"))


def test_every_headline_plot_has_data(browser, dashboard_url, tmp_path):
    dom = chromium(browser, tmp_path, dashboard_url, "--dump-dom").stdout
    page = PanelParser()
    page.feed(dom)
    assert int(page.body.get("data-updates", 0)) >= 1, "the page's script never drew the data"
    assert set(page.panels) == set(HEADLINE) | set(NOT_YET_EXPORTED)
    for name in HEADLINE:
        panel = page.panels[name]
        assert panel["data-state"] == "data", f"{name} shows no data"
        assert int(panel["data-points"]) >= 3, name
        assert panel["lines"] == int(panel["data-series"]) >= 1, name
        assert panel["longest"] >= 1, f"{name}: no line with two points"
    for name in NOT_YET_EXPORTED:
        assert page.panels[name]["data-state"] == "nodata", name
        assert page.panels[name]["lines"] == 0, name


def read_png(path: Path) -> tuple[int, int, list[bytes]]:
    """Width, height and RGB(A) rows of an 8-bit, non-interlaced PNG (what Chromium writes)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    width, height, depth, color, _, _, interlace = header
    assert depth == 8 and color in (2, 6) and interlace == 0, header
    bpp = 3 if color == 2 else 4
    raw = zlib.decompress(idat)
    stride = width * bpp
    rows, prev = [], bytearray(stride)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            if kind == 1:
                line[i] = (line[i] + a) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + b) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (a + b) // 2) & 0xFF
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        rows.append(bytes(line))
        prev = line
    return width, height, [bytes(r[i:i + 3]) for r in rows for i in range(0, stride, bpp)]


def test_screenshot_shows_the_plots(browser, dashboard_url, tmp_path):
    shot = tmp_path / "dashboard.png"
    chromium(browser, tmp_path, dashboard_url, f"--screenshot={shot}")
    width, height, pixels = read_png(shot)
    assert (width, height) == WINDOW
    # Plot lines and legend swatches are the only saturated colours on the page (the
    # header, text and grid are greys), so a page without drawn series has almost none.
    colourful = sum(1 for p in pixels if max(p) - min(p) > 80)
    assert colourful > 2000, f"only {colourful} coloured pixels: no plot lines drawn?"
    target = os.environ.get("TANDEM_DASHBOARD_SCREENSHOT")
    if target:
        shutil.copyfile(shot, target)
