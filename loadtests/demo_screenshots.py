"""Screenshots of the demo page for the README: mid-generation (previews forming) and at the end.

    python -m loadtests.demo_screenshots [--out docs]

Starts the service on the shipped checkpoint (ONNX Runtime, CPU), opens `/` in headless Chromium, generates, and
writes demo_mid.png, demo_done.png (desktop window) and demo_phone.png (a phone-sized window, at the end)."""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from dualrate.checkpoint import DEFAULT_CHECKPOINT
from loadtests.browser import chromium
from loadtests.process import ServerProcess

log = logging.getLogger("demo_screenshots")


def run(url: str, out: Path, size: tuple[int, int], mid: str | None, end: str) -> None:
    driver = chromium(*size)
    try:
        driver.get(url + "/")
        wait = WebDriverWait(driver, 60, poll_frequency=0.02)
        wait.until(lambda d: d.find_element(By.ID, "encoder_interval").find_elements(By.TAG_NAME, "option"))
        Select(driver.find_element(By.ID, "class_label")).select_by_value("7")
        for field, value in (("num_images", 8), ("steps", 128), ("preview_every", 2), ("seed", 2026)):
            el = driver.find_element(By.ID, field)
            el.clear()
            el.send_keys(str(value))
        Select(driver.find_element(By.ID, "encoder_interval")).select_by_value("1")
        driver.find_element(By.ID, "generate").click()
        images = driver.find_element(By.ID, "images")
        if mid:
            wait.until(lambda d: int(images.get_attribute("data-previews")) >= 8 * 20)
            driver.execute_script("window.scrollTo(0, 0)")
            driver.save_screenshot(str(out / mid))
            log.info("wrote %s", out / mid)
        WebDriverWait(driver, 300).until(lambda d: images.get_attribute("data-done") == "true")
        # Desktop: from the top; phone (one column): the output, below the form.
        driver.execute_script("window.scrollTo(0, 0)" if mid else "document.getElementById('output').scrollIntoView()")
        driver.save_screenshot(str(out / end))
        log.info("wrote %s", out / end)
    finally:
        driver.quit()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("docs"))
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    srv = ServerProcess(a.checkpoint, Path(tempfile.mkdtemp()) / "server.log", max_active_images=16,
                        max_images_per_request=8)
    try:
        srv.wait_ready()
        run(srv.url, a.out, (1280, 900), "demo_mid.png", "demo_done.png")
        run(srv.url, a.out, (390, 844), None, "demo_phone.png")
    finally:
        srv.terminate()


if __name__ == "__main__":
    main()
