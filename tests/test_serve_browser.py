"""The search page in a real browser: headless Chromium (Debian's chromium + chromium-driver, installed by
`scripts/setup.sh dev` as root) driven by Selenium against a real server process. It picks a query image, drags a
box on it and checks that the results render, each with its winning box where the API says it is.

PATCHIFY_SCREENSHOT=docs/serve.png saves the page (the README's screenshot)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'patchify[serve]')")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the test extra)")

from conftest import PHOTOS  # noqa: E402
from serve_thumbnail import ThumbnailServer, build_index  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


@pytest.fixture
def browser():
    if not (CHROMIUM and DRIVER):
        reason = "Debian's chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the browser test: {reason}")
        pytest.skip(reason)
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1280,900", "--force-device-scale-factor=1"):
        options.add_argument(argument)
    # The driver is named explicitly: Selenium Manager would otherwise try to download one.
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def test_page_searches_a_dragged_box_and_draws_the_winning_boxes(browser, tmp_path: Path) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    index = build_index(tmp_path / "index")
    query = PHOTOS / "fruits.jpg"  # 512 x 480
    with ThumbnailServer(index) as server:
        browser.get(server.url + "/")
        wait = WebDriverWait(browser, 20)
        wait.until(lambda d: "20 images" in d.find_element(By.ID, "info").text)
        browser.find_element(By.ID, "file").send_keys(str(query))
        canvas = wait.until(ready.visibility_of_element_located((By.ID, "query-canvas")))
        wait.until(lambda d: d.execute_script("return arguments[0].width", canvas) > 0)
        # Drag from the canvas's top-left corner to its middle: the image's top-left quadrant.
        width, height = canvas.size["width"], canvas.size["height"]
        ActionChains(browser).move_to_element_with_offset(canvas, -width // 2 + 2, -height // 2 + 2) \
            .click_and_hold().move_by_offset(width // 4, height // 4).move_by_offset(width // 4 - 2, height // 4 - 2) \
            .release().perform()
        wait.until(lambda d: "results for the box" in d.find_element(By.ID, "status").text)
        box_text = browser.find_element(By.ID, "box-text").text
        x0, y0, x1, y1 = (int(v) for v in box_text.removeprefix("box ").split(","))
        assert x0 <= 8 and y0 <= 8 and abs(x1 - 256) <= 8 and abs(y1 - 240) <= 8, box_text

        cards = browser.find_elements(By.CSS_SELECTOR, "#results .result")
        assert len(cards) == 12  # the page's default k
        wait.until(lambda d: d.execute_script(
            "return [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)"))
        # Each card's box sits where the API's box is, scaled to the thumbnail as shown.
        for card in cards:
            image = card.find_element(By.TAG_NAME, "img")
            box = card.find_element(By.CLASS_NAME, "box")
            natural = browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", image)
            scale = image.size["width"] / natural[0]
            assert box.size["width"] > 4 and box.size["height"] > 4
            assert box.location["x"] >= image.location["x"] - 4
            assert box.location["x"] + box.size["width"] <= image.location["x"] + image.size["width"] + 4
            assert box.location["y"] + box.size["height"] <= image.location["y"] + image.size["height"] + 4
            assert scale > 0
        first = cards[0]
        assert "#1" in first.text and "fruits.jpg" in first.text  # the source of the box ranks first
        image = first.find_element(By.TAG_NAME, "img")
        box = first.find_element(By.CLASS_NAME, "box")
        scale = image.size["width"] / browser.execute_script("return arguments[0].naturalWidth", image)
        # fruits.jpg's top-left 2x2 cell (0,0)-(256,240), drawn at the thumbnail's scale.
        assert abs(box.location["x"] - image.location["x"]) <= 4
        assert abs(box.size["width"] - 256 * scale) <= 6 and abs(box.size["height"] - 240 * scale) <= 6

        screenshot = os.environ.get("PATCHIFY_SCREENSHOT")
        if screenshot:
            browser.save_screenshot(screenshot)
        first.click()  # the large view
        viewer = wait.until(ready.visibility_of_element_located((By.ID, "viewer")))
        assert "fruits.jpg" in viewer.text
        assert viewer.find_element(By.CLASS_NAME, "box").size["width"] > 20
