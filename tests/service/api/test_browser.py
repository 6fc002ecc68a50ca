"""The demo page and the API docs in a real browser (headless Chromium via selenium) against a real server.

Skipped only where Chromium cannot be installed; in CI (CI=true) a missing browser fails instead."""

from __future__ import annotations

import os

import pytest

from loadtests.browser import chromium, chromium_paths

pytestmark = pytest.mark.slow

if chromium_paths() is None:
    if os.environ.get("CI"):
        raise RuntimeError("CI must run the browser tests: chromium / chromedriver missing (scripts/install_test_tools.sh)")
    pytest.skip("chromium and chromedriver are not installed", allow_module_level=True)

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def server(start_server):
    return start_server(max_active_images=8, max_images_per_request=4, max_steps=256)


@pytest.fixture(params=[(1280, 900), (390, 844)], ids=["desktop", "phone"])
def browser(request):
    driver = chromium(*request.param)
    yield driver
    driver.quit()


def set_value(driver, element_id: str, value: object) -> None:
    el = driver.find_element(By.ID, element_id)
    el.clear()
    el.send_keys(str(value))


def test_demo_page_shows_previews_then_the_final_images(server, browser):
    browser.get(server.url + "/")
    wait = WebDriverWait(browser, 60, poll_frequency=0.02)
    wait.until(lambda d: d.find_element(By.ID, "encoder_interval").find_elements(By.TAG_NAME, "option"))
    k_options = [o.text for o in Select(browser.find_element(By.ID, "encoder_interval")).options]
    assert any("FID" in t for t in k_options), k_options  # the card's FID cost beside K
    assert not browser.find_element(By.ID, "model-field").is_displayed()  # one model: no model select
    Select(browser.find_element(By.ID, "class_label")).select_by_value("5")
    set_value(browser, "num_images", 3)
    set_value(browser, "steps", 96)
    Select(browser.find_element(By.ID, "encoder_interval")).select_by_value("1")
    set_value(browser, "preview_every", 2)
    browser.find_element(By.ID, "generate").click()
    images = browser.find_element(By.ID, "images")
    # Before the first preview: a blank tile per image, never a broken-image icon (an <img> with no picture has
    # naturalWidth 0 and shows its alt text).
    tiles = browser.execute_script("return [...document.querySelectorAll('#images img')].map("
                                   "i => [i.className, i.getAttribute('src') || ''])")
    assert len(tiles) == 3 and all(src.startswith("data:image/") for _, src in tiles), tiles
    assert {cls for cls, _ in tiles} <= {"placeholder", "preview"}, tiles
    # A preview is on the page while the final images are not yet there.
    wait.until(lambda d: int(images.get_attribute("data-previews")) >= 1 and images.get_attribute("data-done") == "false")
    WebDriverWait(browser, 120).until(lambda d: images.get_attribute("data-done") == "true")
    finals = browser.find_elements(By.CSS_SELECTOR, "#images img.final")
    assert len(finals) == 3
    sizes = browser.execute_script(
        "return [...document.querySelectorAll('#images img.final')].map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
    assert sizes == [[True, 28, 28]] * 3  # decoded PNGs of the model's size
    summary = browser.find_element(By.ID, "summary").text
    assert "96 encoder calls" in summary and "previews" in summary
    assert "done in" in browser.find_element(By.ID, "status").text
    # encoder_interval "auto" from the page: the service picks K and the summary says which.
    Select(browser.find_element(By.ID, "encoder_interval")).select_by_value("auto")
    set_value(browser, "steps", 32)
    browser.find_element(By.ID, "generate").click()
    WebDriverWait(browser, 120).until(lambda d: "picked by the service" in d.find_element(By.ID, "summary").text)
    assert "K = 4 (picked by the service)" in browser.find_element(By.ID, "summary").text  # idle: the card's default
    # The priority picked on the page reaches the engine core.
    import httpx

    from loadtests.process import metric

    name, label = "dualrate_priority_request_duration_seconds_count", 'priority="batch"'
    before = metric(httpx.get(server.url + "/metrics").text, name, label)
    Select(browser.find_element(By.ID, "priority")).select_by_value("batch")
    browser.find_element(By.ID, "generate").click()
    WebDriverWait(browser, 120).until(lambda d: metric(httpx.get(server.url + "/metrics").text, name, label) > before)
    # Fits the window: no horizontal scrolling on a phone or a desktop.
    assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")


def test_api_docs_render_offline(server, browser):
    browser.get(server.url + "/docs")
    WebDriverWait(browser, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".opblock-summary-path"))
    paths = {e.get_attribute("data-path") for e in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")}
    assert {"/generate", "/generate/stream", "/v1/model", "/health/ready"} <= paths, paths
    # Every script, style and image came from the service itself (no CDN).
    resources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert resources and all(r.startswith(server.url) for r in resources), resources


@pytest.fixture(scope="module")
def keyed_server(start_server):
    return start_server(max_active_images=8, max_images_per_request=4, api_keys="page-key")


def test_with_a_key_the_first_generate_waits_for_the_model_and_the_card_figures_say_what_they_are(keyed_server,
                                                                                                    browser):
    browser.get(keyed_server.url + "/")
    wait = WebDriverWait(browser, 60, poll_frequency=0.02)
    wait.until(lambda d: "enter the API key" in d.find_element(By.ID, "model-line").text)
    # Type the key and press Generate at once: the form is still empty (the model is read after the key), and the
    # page once sent it as it was (422: steps and encoder_interval empty).
    browser.find_element(By.ID, "api_key").send_keys("page-key")
    browser.find_element(By.ID, "generate").click()
    images = browser.find_element(By.ID, "images")
    WebDriverWait(browser, 120).until(lambda d: images.get_attribute("data-done") == "true"
                                      or "Error" in d.find_element(By.ID, "status").text)
    assert images.get_attribute("data-done") == "true", browser.find_element(By.ID, "status").text
    k_options = Select(browser.find_element(By.ID, "encoder_interval")).options
    assert len(k_options) == len({o.get_attribute("value") for o in k_options})  # the form was filled once
    # "auto" shows the card's figures for each K it may pick, not a blank line.
    Select(browser.find_element(By.ID, "encoder_interval")).select_by_value("auto")
    cost = browser.find_element(By.ID, "k-cost").text
    assert "auto picks K" in cost and "K = 4: FID" in cost and "K = 8: FID" in cost and "±" in cost, cost
    # Other steps than the card's: the figures say they are for N = 32.
    set_value(browser, "steps", 128)
    cost = browser.find_element(By.ID, "k-cost").text
    assert "N = 32" in cost and "you asked for N = 128" in cost, cost
    # No favicon request (it was a 404 on every load).
    assert "favicon" not in keyed_server.log()


@pytest.fixture(scope="module")
def named_server(start_server, tmp_path_factory):
    """A random tiny checkpoint whose card names its classes, as a Fashion-MNIST model's does."""
    import json

    from dualrate.data import DATASETS
    from dualrate.init import init_checkpoint

    ck = init_checkpoint("tiny", tmp_path_factory.mktemp("ck") / "named", seed=5)
    card = json.loads((ck / "model_card.json").read_text())
    card["data"] = {"dataset": "fashion-mnist", "class_names": list(DATASETS["fashion-mnist"].class_names)}
    (ck / "model_card.json").write_text(json.dumps(card))
    return start_server(checkpoint=ck, max_active_images=4, max_images_per_request=2)


def test_class_names_from_the_card_reach_the_model_info_the_schema_and_the_page(named_server, browser):
    import httpx

    info = httpx.get(named_server.url + "/v1/model").json()
    assert info["image"]["class_names"][:2] == ["T-shirt/top", "Trouser"]
    schema = httpx.get(named_server.url + "/openapi.json").json()
    assert "9 = Ankle boot" in schema["components"]["schemas"]["GenerateRequest"]["properties"]["class_label"]["description"]
    # The metrics count images per class under the card's names (the server is shared by the page's sizes: count
    # the change).
    from loadtests.process import metric

    trouser = 'class_label="1",class_name="Trouser"'
    before = metric(httpx.get(named_server.url + "/metrics").text, "dualrate_class_images_total", trouser)
    r = httpx.post(named_server.url + "/generate", json={"class_label": 1, "num_images": 2, "steps": 4, "seed": 1},
                   timeout=60)
    assert r.status_code == 200, r.text
    metrics = httpx.get(named_server.url + "/metrics").text
    assert metric(metrics, "dualrate_class_images_total", trouser) == before + 2, metrics
    browser.get(named_server.url + "/")
    WebDriverWait(browser, 60).until(lambda d: len(Select(d.find_element(By.ID, "class_label")).options) > 1)
    texts = [o.text for o in Select(browser.find_element(By.ID, "class_label")).options]
    assert "1 (Trouser)" in texts and "9 (Ankle boot)" in texts, texts


@pytest.fixture(scope="module")
def distilled_server(start_server, tiny_student):
    """The tiny student (4 steps, the encoder every 2) served."""
    return start_server(checkpoint=tiny_student[1], max_active_images=4, max_images_per_request=2)


def test_the_page_keeps_a_distilled_student_to_its_schedule(distilled_server, browser):
    browser.get(distilled_server.url + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: "distilled from teacher" in d.find_element(By.ID, "distilled-note").text)
    steps = browser.find_element(By.ID, "steps")
    assert (steps.get_attribute("value"), steps.get_attribute("min"), steps.get_attribute("max")) == ("4", "4", "4")
    assert steps.get_attribute("readonly") is not None
    ks = [o.get_attribute("value") for o in Select(browser.find_element(By.ID, "encoder_interval")).options]
    assert [k for k in ks if k != "auto"] == ["1", "2"], ks  # K = 4 would be a 422: not offered
    assert browser.find_element(By.ID, "guidance_scale").get_attribute("value") == "1"
    browser.find_element(By.ID, "generate").click()
    images = browser.find_element(By.ID, "images")
    WebDriverWait(browser, 120).until(lambda d: images.get_attribute("data-done") == "true")
    assert "4 steps, K = 2" in browser.find_element(By.ID, "summary").text


def test_the_model_select_draws_from_the_picked_model(start_server):
    """A service of two models: the page offers both (the default picked), and a draw from the other one answers
    with that model's images (its `model` in the request)."""
    from tests.conftest import ROOT

    several = start_server(model_repository=ROOT / "checkpoints", models="mnist-dualrate,mnist-dualrate-8step",
                           max_active_images=4, max_images_per_request=2)
    driver = chromium(1280, 900)
    try:
        driver.get(several.url + "/")
        wait = WebDriverWait(driver, 60, poll_frequency=0.02)
        wait.until(lambda d: d.find_element(By.ID, "model").find_elements(By.TAG_NAME, "option"))
        assert driver.find_element(By.ID, "model-field").is_displayed()
        pick = Select(driver.find_element(By.ID, "model"))
        assert [o.get_attribute("value") for o in pick.options] == ["mnist-dualrate", "mnist-dualrate-8step"]
        assert pick.first_selected_option.get_attribute("value") == "mnist-dualrate"
        pick.select_by_value("mnist-dualrate-8step")
        wait.until(lambda d: d.find_element(By.ID, "steps").get_attribute("value") == "8")  # the student's form
        set_value(driver, "num_images", 1)
        driver.find_element(By.ID, "generate").click()
        images = driver.find_element(By.ID, "images")
        WebDriverWait(driver, 120).until(lambda d: images.get_attribute("data-done") == "true")
        assert "mnist-dualrate-8step" in driver.find_element(By.ID, "model-line").text
        assert len(driver.find_elements(By.CSS_SELECTOR, "#images img.final")) == 1
    finally:
        driver.quit()


def test_authorize_in_the_api_docs_then_try_a_request(keyed_server):
    """With keys set the OpenAPI document has an HTTP bearer scheme: Swagger UI at /docs shows Authorize (without the
    scheme it has none, and every "Try it out" was a 401); a key given there makes "Try it out" on GET /v1/model
    answer 200."""
    driver = chromium(1280, 900)
    try:
        driver.get(keyed_server.url + "/docs")
        wait = WebDriverWait(driver, 60, poll_frequency=0.05)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "button.authorize"))
        driver.find_element(By.CSS_SELECTOR, "button.authorize").click()
        key_input = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".modal-ux input"))
        key_input.send_keys("page-key")
        driver.find_element(By.CSS_SELECTOR, ".modal-ux button.authorize").click()
        driver.find_element(By.CSS_SELECTOR, ".modal-ux button.btn-done").click()
        block = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#operations-model-model_info_v1_model_get"))
        block.find_element(By.CSS_SELECTOR, ".opblock-summary").click()
        wait.until(lambda d: block.find_element(By.CSS_SELECTOR, ".try-out__btn")).click()
        wait.until(lambda d: block.find_element(By.CSS_SELECTOR, ".execute")).click()
        status = wait.until(lambda d: [c.text.strip() for c in block.find_elements(
            By.CSS_SELECTOR, ".live-responses-table tbody .response-col_status") if c.text.strip()])
        assert status[0].startswith("200"), status
    finally:
        driver.quit()
