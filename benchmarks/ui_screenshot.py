"""The README's screenshot: the chat page in compare mode with per-token shading, in Debian's headless Chromium.

    python benchmarks/ui_screenshot.py docs/ui-compare.png

Starts ``sda-local serve`` on the default model, asks one question in compare mode (helpfulness, the server's
self judge, seed 5: the default pipeline) and saves the page as a PNG.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

from server_process import ServerProcess  # noqa: E402


def main(out: str) -> None:
    options = Options()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        with ServerProcess("--parallel", "2") as server:
            driver.get(server.url + "/")
            driver.execute_script("localStorage.clear()")
            driver.get(server.url + "/")
            WebDriverWait(driver, 60).until(lambda d: d.execute_script("return document.body.dataset.ready"))
            Select(driver.find_element(By.ID, "align")).select_by_value("helpfulness")
            driver.find_element(By.ID, "compare").click()
            seed = driver.find_element(By.ID, "seed")
            seed.clear()
            seed.send_keys("5")
            driver.find_element(By.ID, "max-tokens").send_keys("110")
            driver.find_element(By.ID, "prompt").send_keys("How can I sleep better?")
            driver.find_element(By.ID, "send").click()
            WebDriverWait(driver, 300).until(lambda d: d.execute_script(
                "return document.body.dataset.running === 'false'"))
            driver.save_screenshot(out)
    finally:
        driver.quit()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "ui-compare.png")
