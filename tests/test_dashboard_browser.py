"""The dashboard in a real browser: headless Chromium renders /dashboard of a live server.

Needs Chromium (`scripts/install-sysdeps.sh`, which `make test` runs). Without it this test
fails rather than skips: CI installs it, and a skipped browser test would hide a broken page.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from advgrpo.client import Group, RewardClient

from .conftest import REPO, noise_image, smooth_image

pytestmark = pytest.mark.slow
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
WINDOW = (1280, 900)


def find_browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    pytest.fail(
        "headless Chromium is needed for the dashboard browser test but none of "
        f"{', '.join(BROWSERS)} is on PATH; install it with `bash {REPO / 'scripts/install-sysdeps.sh'}` "
        "(`make test` runs it)",
        pytrace=False,
    )


def run_browser(browser: str, profile: Path, url: str, *mode: str) -> subprocess.CompletedProcess:
    cmd = [
        browser,
        "--headless",
        "--no-sandbox",  # tests often run as root in containers
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        "--virtual-time-budget=5000",  # lets the page's first /v1/stats poll land and render
        *mode,
        url,
    ]
    env = {**os.environ, "HOME": str(profile)}  # keeps Chromium's caches and crash dumps out of $HOME
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=90, env=env)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{browser} did not finish in 90 s: {' '.join(cmd)}\n{exc.stderr or ''}")
    assert result.returncode == 0, f"{' '.join(cmd)} exited {result.returncode}:\n{result.stderr[-3000:]}"
    return result


# ---------------------------------------------------------------- a small DOM for the dump


class Node:
    def __init__(self, tag: str, attrs: dict, parent: "Node | None"):
        self.tag, self.attrs, self.parent = tag, attrs, parent
        self.children: list[Node | str] = []

    @property
    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text for c in self.children)

    def iter(self):
        yield self
        for c in self.children:
            if isinstance(c, Node):
                yield from c.iter()

    def find_all(self, tag: str | None = None, **attrs: str) -> list["Node"]:
        want = {k.rstrip("_").replace("_", "-"): v for k, v in attrs.items()}
        return [
            n
            for n in self.iter()
            if (tag is None or n.tag == tag) and all(n.attrs.get(k) == v for k, v in want.items())
        ]

    def find(self, tag: str | None = None, **attrs: str) -> "Node":
        found = self.find_all(tag, **attrs)
        assert len(found) == 1, f"expected one <{tag or '*'} {attrs}>, found {len(found)}"
        return found[0]

    def has_class(self, name: str) -> bool:
        return name in (self.attrs.get("class") or "").split()


class _TreeBuilder(HTMLParser):
    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.root = self.current = Node("#document", {}, None)

    def handle_starttag(self, tag, attrs):
        node = Node(tag, {k: (v if v is not None else "") for k, v in attrs}, self.current)
        self.current.children.append(node)
        if tag not in self.VOID:
            self.current = node

    def handle_startendtag(self, tag, attrs):  # <circle .../> in inline SVG
        self.current.children.append(Node(tag, {k: (v if v is not None else "") for k, v in attrs}, self.current))

    def handle_endtag(self, tag):
        node = self.current
        while node is not None and node.tag != tag:
            node = node.parent
        if node is not None and node.parent is not None:
            self.current = node.parent

    def handle_data(self, data):
        self.current.children.append(data)


def parse_dom(html: str) -> Node:
    builder = _TreeBuilder()
    builder.feed(html)
    builder.close()
    return builder.root


# ---------------------------------------------------------------- the test


def test_dashboard_renders_live_state(tiny_server, tmp_path):
    browser = find_browser()
    rng = np.random.default_rng(0)
    with RewardClient(tiny_server.target, timeout_s=60) as client:
        client.wait_ready(60)
        update = client.update_discriminator(
            "dino",
            references=[Group("", [smooth_image(rng) for _ in range(4)])],
            generated=[Group("", [noise_image(rng) for _ in range(4)])],
        )
        assert update.version == 1 and not update.replayed
        scored = client.score([Group("a cat", [smooth_image(rng), noise_image(rng), smooth_image(rng)])])
        assert scored[0].model_versions == {"dino": 1}
        # Two images without text: OCR gives both 0, a group GRPO learns nothing from.
        blank = client.score([Group('a sign that says "hi"', [smooth_image(rng), smooth_image(rng)])], {"ocr": 1.0})
        assert blank[0].rewards == [0.0, 0.0]

    url = tiny_server.http + "/dashboard"
    dom = parse_dom(run_browser(browser, tmp_path / "profile", url, "--dump-dom").stdout)

    body = dom.find("body")
    assert body.attrs.get("data-loaded") == "true", "the page never rendered /v1/stats (no data-loaded on <body>)"
    assert not dom.find(id="error").has_class("shown"), dom.find(id="error").text
    status = dom.find(id="status")
    assert status.attrs["data-ready"] == "true" and status.text.strip() == "ready"
    assert float(dom.find(id="uptime").attrs["data-seconds"]) > 0

    # Models table: every model, with its version.
    table = dom.find("table", id="models")
    rows = {r.attrs["data-model"]: r for r in table.find_all("tr") if "data-model" in r.attrs}
    assert set(rows) == {"dino", "pickscore", "ocr", "dino_similarity"}
    dino = rows["dino"]
    assert dino.attrs["data-version"] == "1" and dino.attrs["data-trainable"] == "true"
    assert dino.find("td", data_field="version").text == "1"
    assert dino.find("td", data_field="kind").text == "dino"
    assert dino.find("td", data_field="images_scored").text == "3"
    assert rows["ocr"].attrs["data-trainable"] == "false"
    # Model health: nothing failed; OCR's zero-variance group is counted and flagged, dino's is not.
    for name in rows:
        assert rows[name].find("td", data_field="failures").attrs["data-value"] == "0"
        assert rows[name].find("td", data_field="nonfinite").attrs["data-value"] == "0"
        assert rows[name].find("td", data_field="constant").attrs["data-value"] == "false"
    ocr_zero = rows["ocr"].find("td", data_field="zero_variance_groups")
    assert ocr_zero.attrs["data-value"] == "1" and ocr_zero.has_class("warn") and "100 %" in ocr_zero.text
    dino_zero = rows["dino"].find("td", data_field="zero_variance_groups")
    assert dino_zero.attrs["data-value"] == "0" and not dino_zero.has_class("warn")

    # The discriminator card: latest values and a chart point per update.
    card = dom.find("section", data_model="dino", data_version="1")
    assert card.attrs["data-updates"] == "1"
    latest = card.find("dl", data_model="dino")
    assert latest.find("dd", data_field="version").text == "1"
    for field in ("loss", "reference_score", "generated_score", "accuracy"):
        shown = float(latest.find("dd", data_field=field).attrs["data-value"])
        assert shown == pytest.approx(getattr(update, field), rel=1e-5, abs=1e-6), field
    assert latest.find("dd", data_field="loss").text == f"{update.loss:.4f}"
    scores_chart = card.find("svg", data_chart="scores")
    assert scores_chart.attrs["data-points"] == "1"
    for series, expected in (("reference_score", update.reference_score), ("generated_score", update.generated_score)):
        (point,) = scores_chart.find("g", data_series=series).find_all("circle")
        assert point.attrs["data-version"] == "1"
        assert float(point.attrs["data-value"]) == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert card.find("svg", data_chart="loss").find_all("circle")
    (hist_row,) = card.find_all("tr", data_version="1")
    assert float(hist_row.find("td", data_field="accuracy").attrs["data-value"]) == pytest.approx(update.accuracy)
    # pickscore is trainable but was never updated.
    assert dom.find("section", data_model="pickscore").attrs["data-updates"] == "0"

    # Scoring activity: the three images scored by dino, and the events.
    activity = dom.find("table", id="activity").find("tr", data_model="dino")
    assert activity.attrs["data-images"] == "3" and activity.attrs["data-requests"] == "1"
    mean = float(activity.find("td", data_field="mean").attrs["data-value"])
    assert mean == pytest.approx(float(np.mean(scored[0].components["dino"])), rel=1e-5, abs=1e-6)
    kinds = [
        (r.attrs["data-kind"], r.attrs["data-model"])
        for r in dom.find("table", id="events").find_all("tr")
        if "data-kind" in r.attrs
    ]
    assert ("update", "dino") in kinds and ("score", "dino") in kinds

    # A screenshot: the page paints something real (not blank, not one colour).
    shot = tmp_path / "dashboard.png"
    run_browser(browser, tmp_path / "profile-shot", url, f"--screenshot={shot}")
    assert shot.exists() and shot.stat().st_size > 10_000, "no screenshot, or a near-empty one"
    with Image.open(shot) as img:
        assert img.size == WINDOW
        rgb = img.convert("RGB")
        colours = rgb.getcolors(maxcolors=1 << 20)
        assert colours is None or len(colours) > 50, f"screenshot has only {len(colours)} colours"
        # The dark header band and the light page body are both there.
        top, middle = rgb.getpixel((WINDOW[0] // 2, 5)), rgb.getpixel((5, WINDOW[1] // 2))
        assert sum(top) < 200 and sum(middle) > 600, (top, middle)
    keep = os.environ.get("ADVGRPO_DASHBOARD_SCREENSHOT")
    if keep:  # for a look by eye: ADVGRPO_DASHBOARD_SCREENSHOT=/tmp/dash.png pytest tests/test_dashboard_browser.py
        shutil.copyfile(shot, keep)
