"""The dashboard in a real browser: ``moesim app`` serves on 127.0.0.1, headless Chromium (the
system's, never a downloaded one) uploads a trace, compares cache policies, solves a placement
and runs a simulation; the checks read what the page shows, and every page is photographed.

Runs in the default suite when /usr/bin/chromium and playwright are present, skips otherwise.
Screenshots go to $MOESIM_SCREENSHOTS when set, else to a temporary folder.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.browser

if not Path(CHROMIUM).exists():
    pytest.skip(f"{CHROMIUM} is absent (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
pytest.importorskip("streamlit")

TIMEOUT_MS = 90_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "streamlit.log"
    env = {**os.environ, "STREAMLIT_SERVER_FILE_WATCHER_TYPE": "none"}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moesim.cli", "app", "--port", str(port), "--headless"],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    try:
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.read().decode() == "ok":
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the app did not start: {log.read_text()[-2000:]}")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = os.environ.get("MOESIM_SCREENSHOTS")
    path = Path(folder) if folder else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    """A trace to upload, a sweep table, and a real CPU run with its profile when torch is here."""
    import importlib.util

    from tests.app_helpers import cpu_run, small_trace, sweep_table

    folder = tmp_path_factory.mktemp("inputs")
    out = {"trace": small_trace(folder), "sweep": sweep_table(folder), "run": None}
    if importlib.util.find_spec("torch") and importlib.util.find_spec("safetensors"):
        run_dir = folder / "run"
        run_dir.mkdir()
        out["run"] = cpu_run(run_dir)
    return out


def test_upload_cache_placement_simulation_in_chromium(server, shots, inputs):
    expect = sync_api.expect
    expect.set_options(timeout=TIMEOUT_MS)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-dev-shm-usage"])
        page = browser.new_page(viewport={"width": 1500, "height": 2200})
        page.set_default_timeout(TIMEOUT_MS)

        def goto(title: str) -> None:  # client-side navigation keeps the session (and its traces)
            page.get_by_test_id("stSidebarNav").get_by_role("link", name=title).click()
            expect(page.get_by_role("heading", level=1).first).to_be_visible()

        def idle() -> None:
            page.wait_for_timeout(300)
            expect(page.get_by_test_id("stStatusWidget")).to_have_count(0)

        def shot(name: str) -> None:
            idle()
            page.wait_for_timeout(700)  # let Plotly finish drawing
            page.screenshot(path=str(shots / f"{name}.png"), full_page=True)

        page.goto(server)
        expect(page.get_by_role("heading", name="moesim: Mixture-of-Experts inference")).to_be_visible()
        shot("1-overview")

        # Traces: upload a file through the real file input
        goto("Traces")
        page.locator("input[type='file']").first.set_input_files(str(inputs["trace"]))
        expect(page.get_by_text("Loaded 12,288 rows from mixtral-small.parquet as 'mixtral-small'.")).to_be_visible()
        expect(page.get_by_text("Statistics of 'mixtral-small'")).to_be_visible()
        charts = page.locator("[data-testid='stPlotlyChart']")
        expect(charts.first.locator(".main-svg").first).to_be_attached()
        expect(page.get_by_text("Expert load per layer (1 = the mean expert)")).to_be_visible()
        shot("2-traces")

        # Cache & offload: compare the default policies at the default capacities
        goto("Cache & offload")
        page.get_by_role("button", name="Compare policies").click()
        expect(page.get_by_text("replays done")).to_be_visible()
        expect(page.get_by_text("Hit rate against capacity (Belady MIN is the ceiling)")).to_be_visible()
        expect(page.locator(".legend").get_by_text("Belady MIN (ceiling)")).to_be_visible()
        expect(page.get_by_test_id("stDataFrame")).to_be_visible()
        page.get_by_role("button", name="Run the device model").click()
        expect(page.get_by_text("mean latency per token")).to_be_visible()
        shot("3-cache")

        # Placement: solve with the ILP and the baselines, 8 redundant replicas on 8 GPUs
        goto("Placement")
        field = page.get_by_label("Redundant replicas per layer")
        field.fill("8")
        field.press("Enter")
        idle()
        page.get_by_role("button", name="Solve").click()
        expect(page.get_by_role("heading", name="Plans compared")).to_be_visible()
        expect(page.get_by_text("Per-GPU load, layer 0 (token-expert pairs)")).to_be_visible()
        expect(page.get_by_text("tokens sent GPU to GPU")).to_be_visible()
        expect(page.get_by_role("button", name="SGLang expert map")).to_be_visible()
        shot("4-placement")

        # Cluster simulation of the bundled Mixtral scenario
        goto("Cluster simulation")
        page.get_by_role("button", name="Simulate").click()
        expect(page.get_by_text("Results: mixtral-8x7b-ep8")).to_be_visible()
        expect(page.get_by_text("Time to first token")).to_be_visible()
        expect(page.get_by_text("compute per GPU, all-to-all on the links")).to_be_visible()
        shot("5-simulation")

        goto("Validation")
        expect(page.get_by_text("Give a run file and the profile")).to_be_visible()
        if inputs["run"] is not None:
            box = page.get_by_label("Run file (Parquet from moesim run-real)")
            box.fill(str(inputs["run"]))
            box.press("Enter")
            idle()
            page.get_by_role("button", name="Validate").click()
            expect(page.get_by_text("latency MAPE")).to_be_visible()
            expect(page.get_by_text("Per-token latency")).to_be_visible()
        shot("6-validation")

        goto("Sweeps")
        box = page.get_by_label("Results table (.parquet)")
        box.fill(str(inputs["sweep"]))
        box.press("Enter")
        expect(page.get_by_role("heading", name="9 points")).to_be_visible()
        expect(page.locator(".legend").get_by_text("Pareto front")).to_be_visible()
        shot("7-sweeps")
        # no page showed a Python traceback
        assert page.get_by_test_id("stException").count() == 0
        browser.close()
    names = sorted(p.name for p in shots.glob("*.png"))
    assert len(names) == 7 and all((shots / n).stat().st_size > 20_000 for n in names)
