"""The web page in a real headless Chromium: log in, submit the digits job through the form,
watch it finish live on the job list (SSE), open its page and find the report's plots.

Needs Debian's ``chromium`` and ``chromium-driver``: skipped with a reason without them, failed
instead when ``RECALIB_REQUIRE_BROWSER=1`` (CI installs them and sets it).
Screenshots go to ``$RECALIB_SCREENSHOT_DIR`` (``docs/`` to refresh ``docs/web-ui*.png``), else
to the test's tmp dir.
"""

from __future__ import annotations

import base64
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.live import Stack, create_job, upload, wait_for_job

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        (CHROMIUM is None or CHROMEDRIVER is None)
        and os.environ.get("RECALIB_REQUIRE_BROWSER") != "1",
        reason="needs chromium and chromedriver (apt-get install chromium chromium-driver)",
    ),
]
API_KEY = "ops-key-5f1e0c9a7b"
WAIT_S = 90


@pytest.fixture(scope="module")
def stack(live_redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with Stack(
        live_redis_url, tmp_path_factory.mktemp("web"), RECALIB_API_KEYS=f"ops:{API_KEY}"
    ) as stack:
        stack.start_api()
        stack.start_worker("w1")
        yield stack


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """Headless Chromium with its profile and ``TMPDIR`` in a tmp dir of pytest's, removed after
    (else Chromium leaves its singleton socket's directory in /tmp, and chromedriver's profile
    there too when the test process is killed)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.fail("RECALIB_REQUIRE_BROWSER=1 but chromium or chromedriver is not installed")
    scratch = tmp_path_factory.mktemp("chromium")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    options.add_argument("--window-size=1280,800")
    options.add_argument(f"--user-data-dir={scratch / 'profile'}")
    service = Service(executable_path=CHROMEDRIVER, env=os.environ | {"TMPDIR": str(scratch)})
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(scratch, ignore_errors=True)


def _screenshot_dir(tmp_path: Path) -> Path:
    target = Path(os.environ.get("RECALIB_SCREENSHOT_DIR") or tmp_path)
    target.mkdir(parents=True, exist_ok=True)
    return target


def _full_page_screenshot(driver, path: Path) -> None:
    """The whole page, not only the window (Chrome DevTools: capture beyond the viewport)."""
    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    bottom = driver.execute_script(
        "return document.querySelector('main').getBoundingClientRect().bottom + window.scrollY"
    )
    height = min(size["height"], int(bottom) + 24)
    clip = {"x": 0, "y": 0, "width": size["width"], "height": height, "scale": 1}
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": clip}
    )
    path.write_bytes(base64.b64decode(shot["data"]))


def _failed_job(stack: Stack, digits_files: dict[str, Path], tmp_path: Path) -> str:
    """A job over a calibration file that is not data: it fails while loading."""
    bogus = tmp_path / "notes.npz"
    bogus.write_bytes(b"these are not arrays")
    with stack.client() as client:
        client.headers["Authorization"] = f"Bearer {API_KEY}"
        body = {
            "model_file": upload(client, digits_files["model"]),
            "calibration_file": upload(client, bogus),
        }
        job_id = create_job(client, body)["id"]
        assert wait_for_job(client, job_id, {"failed"}, timeout_s=WAIT_S)["error"]
    return str(job_id)


def test_submit_watch_and_open_a_job_in_the_browser(
    browser, stack: Stack, digits_files: dict[str, Path], tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser
    wait = WebDriverWait(driver, WAIT_S, poll_frequency=0.2)
    shots = _screenshot_dir(tmp_path)

    driver.get(stack.url + "/")
    assert "/login" in driver.current_url  # the server has keys: log in first
    driver.find_element(By.ID, "key").send_keys(API_KEY)
    driver.find_element(By.CSS_SELECTOR, "#login-form button").click()
    wait.until(lambda d: d.current_url.rstrip("/") == stack.url)

    failed = _failed_job(stack, digits_files, tmp_path)
    driver.get(stack.url + "/submit")
    _full_page_screenshot(driver, tmp_path / "web-ui-submit.png")
    for field, name in (
        ("model", "model"),
        ("calibration", "calibration"),
        ("evaluation", "evaluation"),
    ):
        driver.find_element(By.ID, field).send_keys(str(digits_files[name]))
    driver.find_element(By.ID, "submit").click()
    wait.until(lambda d: "created=" in d.current_url)
    job_id = driver.current_url.split("created=")[1]
    row = driver.find_element(By.CSS_SELECTOR, f'tr[data-job="{job_id}"]')
    assert row.get_attribute("data-live") is not None
    driver.execute_script("window.__sameDocument = true")

    status = row.find_element(By.CSS_SELECTOR, "[data-field=status]")
    seen = set()

    def finished(_driver) -> bool:
        seen.add(status.text)
        return status.text in {"succeeded", "failed", "cancelled"}

    wait.until(finished)
    assert status.text == "succeeded", driver.page_source[-2000:]
    top1 = row.find_element(By.CSS_SELECTOR, "[data-field=top1]")
    wait.until(lambda _d: "→" in top1.text)
    # Filled in by the page's script from the SSE stream and the API: the page never reloaded.
    assert driver.execute_script("return window.__sameDocument === true")
    assert row.find_element(By.CSS_SELECTOR, "[data-field=verdict]").text == "better"
    before, after = (float(x) for x in top1.text.split("→"))
    assert after > before
    assert seen & {"queued", "running"}  # the status changed on the page
    failed_row = driver.find_element(By.CSS_SELECTOR, f'tr[data-job="{failed}"]')
    assert failed_row.find_element(By.CSS_SELECTOR, "[data-field=status]").text == "failed"
    _full_page_screenshot(driver, shots / "web-ui.png")

    row.find_element(By.LINK_TEXT, job_id).click()
    wait.until(lambda d: d.current_url.endswith(f"/jobs/{job_id}"))
    links = {a.get_attribute("href") for a in driver.find_elements(By.CSS_SELECTOR, "#artifacts a")}
    for artifact in ("checkpoint", "report", "report.html"):
        assert f"{stack.url}/v1/jobs/{job_id}/{artifact}" in links
    frame = driver.find_element(By.ID, "report")
    driver.switch_to.frame(frame)
    try:
        wait.until(lambda d: len(d.find_elements(By.TAG_NAME, "svg")) == 3)
        assert len(driver.find_elements(By.CSS_SELECTOR, "[id^=class-after-]")) == 10
        assert len(driver.find_elements(By.CSS_SELECTOR, "[id^=shift-]")) == 3
        assert driver.find_element(By.ID, "verdict").text == "better"
    finally:
        driver.switch_to.default_content()
    wait.until(lambda d: int(frame.size["height"]) > 1000)  # grown to the report's height
    _full_page_screenshot(driver, shots / "web-ui-job.png")
