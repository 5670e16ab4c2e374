"""The Gradio app (issue 14): its run handler on bad input, and the whole page driven by a real headless browser.

The browser is Debian's `chromium` with its matching `chromium-driver`, driven by Selenium; nothing is downloaded at
test time (`make test` installs both with apt where apt exists). The test starts `transformers-bard app` on a free
local port as a user would, uploads a digits grid, runs one decode, checks the answer and the numbers against the
same decode run here, steps the trace slider, saves a screenshot under the test's tmp folder and stops the server.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("gradio", reason="the app needs gradio: pip install -e '.[app]' (make test installs it)")

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
    "--window-size=1400,1000",
)


# ---------------------------------------------------------------------- the run handler, without a browser
@pytest.fixture(scope="module")
def tiny_decoder(tiny_bard_vl_dir, tiny_qwen3_vl_dir):
    from transformers_bard.app.runner import AppModels, Decoder

    models = AppModels(bard_path=tiny_bard_vl_dir, ar_path=tiny_qwen3_vl_dir, description="tiny", digits=True)
    return Decoder(tiny_bard_vl_dir, tiny_qwen3_vl_dir), models


def _run(decoder, models, image, question="What color is it?", block="4", threshold=0.9):
    from transformers_bard.app.gradio_app import decode_run

    return list(decode_run(decoder, models, image, question, block, threshold, 8, replay_seconds=0.05))


@pytest.mark.parametrize(
    "image, threshold, question, message",
    [
        (None, 0.9, "What color is it?", "reads digit grids: pick an example grid or upload an image"),
        ("corrupt", 0.9, "What color is it?", "Could not read &#x27;broken.png&#x27; as an image"),
        ("good", 1.5, "What color is it?", "must be in (0, 1]"),
        ("good", 0.0, "What color is it?", "must be in (0, 1]"),
        ("good", "abc", "What color is it?", "must be a number in (0, 1], got &#x27;abc&#x27;"),
        ("good", 0.9, "  ", "Type a question"),
    ],
)
def test_bad_input_is_a_message_not_an_error(tiny_decoder, tmp_path, image, threshold, question, message):
    from transformers_bard.testing import make_image

    if image == "corrupt":
        image = tmp_path / "broken.png"
        image.write_bytes(b"not a png at all")
    elif image == "good":
        image = tmp_path / "good.png"
        make_image(0, (32, 32)).save(image)
    results = _run(*tiny_decoder, image, question=question, threshold=threshold)
    assert len(results) == 1
    status, bard_html, ar_html, stats, state = results[0]
    assert 'class="bard-message"' in status and message in status
    assert state is None and stats == ""


def test_run_handler_replays_then_shows_the_result(tiny_decoder, tmp_path):
    from transformers_bard.testing import make_image

    decoder, models = tiny_decoder
    image = tmp_path / "good.png"
    make_image(0, (32, 32)).save(image)
    results = _run(decoder, models, image)
    *replay, final = results
    assert len(replay) >= 1 and all(r[-1] is None for r in replay)
    status, bard_html, ar_html, stats, state = final
    bard = decoder.run_bard(decoder.inputs(make_image(0, (32, 32)), "What color is it?"), 4, 0.9, 8)
    ar = decoder.run_ar(decoder.inputs(make_image(0, (32, 32)), "What color is it?"), 8)
    assert "BARD answer: " in status and f"AR answer: {ar.text}" in status
    assert len(state["frames"]) == bard.num_forwards + 1
    assert f'<td class="forwards">{bard.num_forwards}</td>' in stats
    assert f'<td class="tpf">{bard.tokens_per_forward:.2f}</td>' in stats
    assert f'<td class="tokens">{len(ar.tokens)}</td>' in stats.split('id="stats-ar"')[1]
    assert bard_html.count('class="tok') == len(state["frames"][-1].tokens)


def test_default_models_prefer_a_demo_stage_then_the_converted_source(tmp_path):
    import json

    from transformers_bard.app.runner import ar_source_of, find_demo_model, resolve_models
    from transformers_bard.demo.digits import load_digits_ar_path

    demo = tmp_path / "demo_output"
    for b in (4, 16, 8):
        (demo / "pbm" / f"stage-b{b}").mkdir(parents=True)
        config = {"source_model": str(load_digits_ar_path()), "block_size": b}
        (demo / "pbm" / f"stage-b{b}" / "config.json").write_text(json.dumps(config))
    (demo / "pbm" / "stage-b32").mkdir()  # no config.json: not a stage
    assert find_demo_model(demo) == demo / "pbm" / "stage-b16"
    models = resolve_models(demo_dir=demo, cache_dir=tmp_path / "cache")
    assert models.bard_path == demo / "pbm" / "stage-b16" and models.ar_path == load_digits_ar_path()
    assert models.digits and "stage-b16" in models.description
    assert find_demo_model(tmp_path / "nothing") is None
    # a checkpoint whose source_model is not a local folder (a Hub id) has no known AR source
    hub = tmp_path / "hub-converted"
    hub.mkdir()
    (hub / "config.json").write_text(json.dumps({"source_model": "Qwen/Qwen3-VL-4B-Instruct"}))
    assert ar_source_of(hub) is None and ar_source_of(demo / "pbm" / "stage-b4") == load_digits_ar_path()
    with pytest.raises(FileNotFoundError, match="`model`="):
        resolve_models(tmp_path / "missing", cache_dir=tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="`--ar-source`="):
        resolve_models(demo / "pbm" / "stage-b4", ar_source=tmp_path / "missing")


# ---------------------------------------------------------------------- the page in a real browser
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _browser():
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not Path(path).exists()]
    if missing:
        pytest.skip(f"no headless browser: {' and '.join(missing)} missing; install Debian's chromium and "
                    "chromium-driver (`apt-get install -y chromium chromium-driver`, done by `make test` where apt "
                    "is available)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is missing: pip install -e '.[dev]'")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    return webdriver, options, Service(CHROMEDRIVER)


@pytest.fixture
def app_server(tmp_path):
    """`transformers-bard app` on a free port, run from an empty folder (so the default models are the shipped digits
    AR source and its on-the-fly conversion, cached under tmp_path)."""
    port = _free_port()
    work = tmp_path / "work"
    work.mkdir()
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", OMP_NUM_THREADS="1", NO_PROXY="127.0.0.1,localhost")
    command = [sys.executable, "-m", "transformers_bard.cli", "app", "--port", str(port), "--cache-dir",
               str(tmp_path / "cache"), "--replay-seconds", "0.6"]
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(command, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            pytest.fail(f"the app did not start:\n{(tmp_path / 'server.log').read_text()[-3000:]}")
        time.sleep(0.3)
    yield url, tmp_path / "cache"
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
    log.close()


def test_app_in_a_real_browser(app_server, tmp_path):
    webdriver, options, service = _browser()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from transformers_bard.app.runner import Decoder
    from transformers_bard.demo.digits import READ_QUESTION, build_digits_dataset, load_digits_ar_path

    url, cache = app_server
    grid = build_digits_dataset("test", 1, seed=3)[0]["images"][0]
    image_path = tmp_path / "grid.png"
    grid.save(image_path)

    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    driver = webdriver.Chrome(options=options, service=service)
    try:
        wait = WebDriverWait(driver, 30)
        driver.get(url)
        wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "#run")))
        assert "converted to BARD-VL" in driver.find_element(By.TAG_NAME, "body").text  # says which model is shown

        # bad input first: a threshold outside (0, 1] is a message in the page
        driver.find_element(By.CSS_SELECTOR, "#image-file input[type=file]").send_keys(str(image_path))
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#preview img"))
        threshold = driver.find_element(By.CSS_SELECTOR, "#threshold input")
        threshold.send_keys(Keys.CONTROL, "a")
        threshold.send_keys("1.5")
        driver.find_element(By.CSS_SELECTOR, "#run").click()
        wait.until(ec.text_to_be_present_in_element((By.CSS_SELECTOR, "#status"), "must be in (0, 1]"))

        threshold.send_keys(Keys.CONTROL, "a")
        threshold.send_keys("0.9")
        driver.find_element(By.CSS_SELECTOR, "#run").click()
        wait.until(ec.text_to_be_present_in_element((By.CSS_SELECTOR, "#status"), "BARD answer:"))

        # the same decode here: the page must show its answer and its numbers
        decoder = Decoder(cache / "digits-bard-vl-b4", load_digits_ar_path())
        inputs = decoder.inputs(grid, READ_QUESTION)
        bard, ar = decoder.run_bard(inputs, 4, 0.9, 64), decoder.run_ar(inputs, 64)
        status = driver.find_element(By.CSS_SELECTOR, "#status").text  # the browser collapses runs of spaces

        def squeeze(text):
            return " ".join(text.split())

        assert f"BARD answer: {squeeze(bard.text)}".strip() in status and f"AR answer: {squeeze(ar.text)}" in status
        stats_bard = driver.find_element(By.CSS_SELECTOR, "#stats-bard").text.split()
        stats_ar = driver.find_element(By.CSS_SELECTOR, "#stats-ar").text.split()
        assert stats_bard[:4] == ["BARD", str(len(bard.tokens)), str(bard.num_forwards), f"{bard.tokens_per_forward:.2f}"]
        assert stats_ar[:4] == ["AR", str(len(ar.tokens)), str(len(ar.tokens)), "1.00"]
        assert float(stats_bard[4]) > 0 and float(stats_ar[4]) > 0  # wall times in ms
        assert re.search(r"speedup \d+\.\d\dx", driver.find_element(By.CSS_SELECTOR, "#stats").text)
        shown = driver.find_elements(By.CSS_SELECTOR, "#bard-output .tok")
        assert len(shown) >= len(bard.tokens) and not driver.find_elements(By.CSS_SELECTOR, "#bard-output .mask")

        # step back to the prefill with the slider's number box: masks are back
        step = driver.find_element(By.CSS_SELECTOR, "#trace-slider input[type=number]")
        step.send_keys(Keys.CONTROL, "a")
        step.send_keys("0", Keys.ENTER)
        wait.until(lambda d: squeeze(d.find_element(By.CSS_SELECTOR, "#step-label").text).startswith("fwd 0 block 0"))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#bard-output .mask"))

        step.send_keys(Keys.CONTROL, "a")
        step.send_keys(str(bard.num_forwards), Keys.ENTER)
        wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, "#bard-output .mask"))
        screenshot = tmp_path / "app.png"
        assert driver.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 10_000
        if os.environ.get("BARD_APP_SCREENSHOT"):  # how docs/app.png is made
            shutil.copy(screenshot, os.environ["BARD_APP_SCREENSHOT"])
    finally:
        driver.quit()


def test_run_handler_verifies_with_the_ar_model(tiny_decoder, tmp_path):
    """With "verify" ticked the BARD answer is the AR answer (DESIGN 4.2 a) and the replay holds the verifier's
    frames (one per forward of both models after the two prefills)."""
    from transformers_bard.app.gradio_app import decode_run
    from transformers_bard.testing import make_image

    decoder, models = tiny_decoder
    image = tmp_path / "good.png"
    make_image(0, (32, 32)).save(image)
    *_, final = decode_run(decoder, models, image, "What color is it?", "4", 0.9, 8, replay_seconds=0.05, verify=True)
    status, _, _, _, state = final
    ar = decoder.run_ar(decoder.inputs(make_image(0, (32, 32)), "What color is it?"), 8)
    assert f"BARD answer: {ar.text}  |  AR answer: {ar.text}" in status
    kinds = [frame.kind for frame in state["frames"]]
    assert kinds[0] == "prefill" and kinds.count("verifier_prefill") == 1 and "verify" in kinds
