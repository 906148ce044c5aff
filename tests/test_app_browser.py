"""The web demo in a real browser: playwright drives Debian's chromium (no downloaded browsers).

Starts the app's server in-process (`vadusa.cli.app.serve`, what `python app.py` runs) on a free port, types a
sentence, runs, and checks every player's wav (fetched through the player's download link): its length equals
the stats table's and is plausible for the text. Then empty text shows the CLI's error and the server still
answers. Screenshot: VADUSA_SCREENSHOT=docs/app.png.
"""

import importlib.util
import io
import os
import shutil
import socket
import urllib.request
from pathlib import Path

import pytest
import soundfile

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
TEXT = "The quick brown fox jumps over the lazy dog."

pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)"),
    pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed"),
]
playwright = pytest.importorskip("playwright.sync_api", reason="playwright not installed (pip install playwright)")
if importlib.util.find_spec("gradio") is None:  # imported by the fixture, not at collection (~5 s)
    pytest.skip('gradio not installed (pip install ".[app]")', allow_module_level=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url():
    from vadusa.cli import app

    demo = app.serve(app.parse_args(["--port", str(free_port()), "--no-stream-audio"]))  # a real server, in-process
    try:
        yield demo.local_url
    finally:
        demo.close()


def table_column(page, header: str) -> list[float]:
    rows = page.locator("#stats table tr").all_inner_texts()
    cells = [r.split("\t") for r in rows]
    col = [c.strip() for c in cells[0]].index(header)
    return [float(c[col]) for c in cells[1:]]


def test_page_speaks_and_shows_errors(app_url, tmp_path):
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 1400})
        page.goto(app_url)
        page.locator("#text textarea").fill(TEXT)
        page.locator("#run").click()
        page.wait_for_function("document.querySelector('#status')?.innerText.startsWith('done')", timeout=60_000)
        players = "[id^=audio-] a[download]"  # each player's wav (gradio's download link of its audio element)
        page.wait_for_function(f"document.querySelectorAll('{players}').length === 3", timeout=10_000)
        seconds = []
        for src in page.eval_on_selector_all(players, "els => els.map(e => e.href)"):
            wav, sr = soundfile.read(io.BytesIO(page.request.get(src).body()))
            seconds.append(len(wav) / sr)
        assert seconds == pytest.approx(table_column(page, "audio (s)"), abs=0.011)  # the players hold the runs
        assert all(0.04 * len(TEXT) < s < 0.15 * len(TEXT) for s in seconds), seconds  # ~0.07 s per character
        assert all(0 <= c < 0.5 for c in table_column(page, "CER"))
        page.wait_for_timeout(500)  # let the plots settle
        shot = Path(os.environ.get("VADUSA_SCREENSHOT", tmp_path / "app.png"))
        page.screenshot(path=str(shot), full_page=True)

        page.locator("#text textarea").fill("")
        page.locator("#run").click()
        page.wait_for_function("document.querySelector('#status')?.innerText.startsWith('error')", timeout=20_000)
        assert page.locator("#status").inner_text() == "error: text '' is empty or has no letters: nothing to say"
        browser.close()
    assert urllib.request.urlopen(app_url, timeout=5).status == 200  # the server kept running
