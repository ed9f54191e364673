"""The run report: files, tables and offline rendering, on a FAKE run (tests/fake_run.py)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dtrak import figures
from dtrak.report import LDS_DECIMALS, format_lds, write_report
from fake_run import FakeRun, make_fake_run

EXPECTED_PNGS = (
    "data-preview.png", "training-loss.png", "gen-grid.png", "lds-bar.png",
    "lds-vs-lambda.png", "gallery-gen-0000.png", "gallery-val-0000.png", "cf-pixel_l2.png",
    "cf-clip_cos.png", "cf-target-0000.png",
)


class _Page(HTMLParser):
    """Collects <img> sources, links, the LDS cells and the #dtrak-check attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.imgs: list[str] = []
        self.links: list[str] = []
        self.cells: dict[tuple[str, str, str], str] = {}
        self.check: dict[str, str] = {}
        self._cell: tuple[str, str, str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "img":
            self.imgs.append(a["src"])
        if tag in ("a", "link", "script") and (a.get("href") or a.get("src")):
            self.links.append(a.get("href") or a.get("src") or "")
        if tag == "td" and a.get("data-kind") == "method":
            self._cell = (a["data-method"], a["data-targets"], a["data-selection"])
            self.cells[self._cell] = ""
        if a.get("id") == "dtrak-check":
            self.check = a

    def handle_endtag(self, tag: str) -> None:
        if tag == "td":
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self.cells[self._cell] += data


def _parse(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    return page


def _assert_lds_table(page: _Page, run: Path) -> None:
    """Every LDS record is in the table, with the same decimals as the report's format."""
    records = json.loads((run / "results" / "lds.json").read_text())["records"]
    assert len(page.cells) == len(records)
    for r in records:
        text = " ".join(page.cells[(r["method"], r["targets"], r["lambda_selection"])].split())
        lo, hi = (f"{v:.{LDS_DECIMALS}f}" for v in (r["ci_low"], r["ci_high"]))
        assert text.startswith(f"{r['lds']:.{LDS_DECIMALS}f} [{lo}, {hi}]"), text
        assert "λ =" in text


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> tuple[FakeRun, Path]:
    fake = make_fake_run(tmp_path_factory.mktemp("report") / "run")
    index = write_report(fake.root, fake.train_images, fake.val_images, n_gallery=1)
    return fake, index


def test_report_writes_page_and_figures(full):
    fake, index = full
    assert index == fake.root / "report" / "index.html"
    for name in EXPECTED_PNGS:
        with Image.open(index.parent / name) as im:
            assert im.format == "PNG" and min(im.size) > 10, name
    page = _parse(index.read_text())
    assert sorted(page.imgs) == sorted(p.name for p in index.parent.glob("*.png"))
    assert not [u for u in page.links if re.match(r"[a-z]+://", u)], "page must work offline"


def test_report_content(full):
    fake, index = full
    text = index.read_text()
    assert "fake-run" in text and "report written" in text
    _assert_lds_table(_parse(text), fake.root)
    assert format_lds(61.23, 55.5, 66.04) == "61.2 [55.5, 66.0]" and "61.2" in text
    for setting in ("n_subsets M = 4", "n_targets = 10", "K = 3", "k = 64", "paper, heldout"):
        assert setting in text
    config = json.loads((fake.root / "config.json").read_text())
    assert '&quot;proj_dim&quot;: 64' in text and config["name"] == "fake-run"
    # the gallery's first proponent is the training image with the highest score
    scores = np.load(fake.root / "scores" / "trak" / "gen.npy")
    assert re.search(rf"<td>TRAK</td><td>#{int(np.argmax(scores[0]))} \(", text)


def test_report_of_an_almost_empty_run_notes_what_is_missing(tmp_path):
    run = tmp_path / "run"
    (run / "report").mkdir(parents=True)
    (run / "report" / "stale.png").write_bytes(b"old")
    (run / "config.json").write_text(json.dumps({"name": "bare"}))
    index = write_report(run)
    text = index.read_text()
    assert not (run / "report" / "stale.png").exists()
    for missing in ("data/summary.json", "results/lds.json", "train_images=None",
                    "results/counterfactual.json", "gen/grid.png"):
        assert missing in text, missing
    assert "<img" not in text


def test_report_builds_counterfactual_strips_from_images(tmp_path):
    fake = make_fake_run(tmp_path / "run", counterfactual="images", n_train=20, n_targets=4,
                         channels=1)
    index = write_report(fake.root)  # no training images: galleries skipped
    assert (index.parent / "cf-target-0002.png").is_file()
    assert "galleries skipped" in index.read_text()
    assert "difference of medians" in index.read_text()


def test_gallery_checks_shapes_and_writes_png(tmp_path):
    rng = np.random.default_rng(0)
    train = rng.uniform(-1, 1, (10, 1, 6, 6)).astype(np.float32)
    scores = {"trak": np.arange(10.0), "dtrak": -np.arange(10.0)}
    path = figures.attribution_gallery(train[0], train, scores, tmp_path / "g.png", k=3)
    assert Image.open(path).size[0] > Image.open(path).size[1]
    with pytest.raises(ValueError, match="expected \\[10\\]"):
        figures.attribution_gallery(train[0], train, {"trak": np.zeros(9)}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="same image shape"):
        figures.attribution_gallery(train[0, :, :3], train, scores, tmp_path / "x.png")


def test_samples_per_prompt_draws_one_row_per_prompt(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (6, 3, 8, 8)).astype(np.float32)
    one = figures.samples_per_prompt(images, ["a cat"] * 6, tmp_path / "one.png")
    three = figures.samples_per_prompt(images, ["a cat", "a dog", ""] * 2, tmp_path / "3.png")
    h1, h3 = Image.open(one).size[1], Image.open(three).size[1]
    assert h3 > 2 * h1  # three rows of images against one
    assert Image.open(one).size[0] > Image.open(three).size[0]  # six columns against two
    with pytest.raises(ValueError, match="one prompt per image"):
        figures.samples_per_prompt(images, ["a cat"] * 5, tmp_path / "x.png")


# ------------------------------------------------------------------------------ browser


def _chromium() -> str | None:
    for name in (os.environ.get("DTRAK_CHROMIUM"), "chromium", "chromium-browser",
                 "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _headless(browser: str, url: str, profile: Path, *extra: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", "--enable-logging=stderr", "--v=0",
             f"--user-data-dir={profile}", "--virtual-time-budget=5000"]
    return subprocess.run([browser, *flags, *extra, url], capture_output=True, text=True,
                          timeout=120, check=False)


@pytest.mark.browser
def test_report_renders_in_headless_chromium(full, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("headless Chromium not found (apt-get install chromium, or set "
                    "DTRAK_CHROMIUM to its path)")
    fake, index = full
    url = index.resolve().as_uri()
    dom = _headless(browser, url, tmp_path / "profile", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = _parse(dom.stdout)
    assert page.check.get("data-status") == "done", "the page's load handler did not run"
    assert json.loads(page.check["data-errors"]) == []
    assert not re.findall(r"CONSOLE.*Uncaught.*", dom.stderr)
    ok, total = map(int, page.check["data-images-ok"].split("/"))
    assert ok == total == len(list(index.parent.glob("*.png"))), page.check.get("data-broken")
    _assert_lds_table(page, fake.root)
    shot = tmp_path / "report.png"
    _headless(browser, url, tmp_path / "profile2", f"--screenshot={shot}",
              "--window-size=1280,4000")
    with Image.open(shot) as im:
        assert im.size == (1280, 4000)
