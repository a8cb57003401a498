"""The chat page at ``/`` in a real headless Chromium (Debian's ``chromium`` and ``chromium-driver``, driven by
Selenium), against a real ``sda-local serve`` on the default model."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest
import requests

from server_process import ServerProcess, metric

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

pytestmark = pytest.mark.slow

CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
WAIT = 240  # seconds: a generous bound for a busy CI machine, never a timing assertion


@pytest.fixture(scope="module")
def browser():
    if not (os.path.exists(CHROMEDRIVER) and os.path.exists(CHROMIUM)):
        if os.environ.get("CI"):
            pytest.fail("chromium and chromium-driver are not installed (.ci/run installs them)")
        pytest.skip("chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)")
    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1000"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def server():
    with ServerProcess("--parallel", "2", "--threads", "2") as s:
        yield s


def wait(driver, condition, timeout=WAIT):
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: condition())


def js(driver, script, *args):
    return driver.execute_script(script, *args)


def open_page(driver, server, *, fresh=True):
    driver.get(server.url + "/")
    if fresh:
        js(driver, "localStorage.clear(); sessionStorage.clear();")
        driver.get(server.url + "/")
    wait(driver, lambda: js(driver, "return document.body.dataset.ready") == "true")


def settings(driver, *, align="", amplifier="judge", strength=None, compare=False, seed=1, max_tokens=None):
    Select(driver.find_element(By.ID, "align")).select_by_value(align)
    Select(driver.find_element(By.ID, "amplifier")).select_by_value(amplifier)
    if strength is not None:
        js(driver, "const s = document.getElementById('strength'); s.value = arguments[0];"
                   "s.dispatchEvent(new Event('input'));", str(strength))
    box = driver.find_element(By.ID, "compare")
    if box.is_selected() != compare:
        box.click()
    for field, value in (("seed", seed), ("max-tokens", max_tokens)):
        element = driver.find_element(By.ID, field)
        element.clear()
        if value is not None:
            element.send_keys(str(value))


def send(driver, text):
    box = driver.find_element(By.ID, "prompt")
    box.clear()
    box.send_keys(text)
    driver.find_element(By.ID, "send").click()


def finished(driver):
    return js(driver, "return document.body.dataset.running") == "false"


def answers(driver):
    """The last assistant message's answers: (label, text, finish, [per-token js])."""
    return js(driver, """
        const views = document.querySelectorAll('#messages .message.assistant:last-child .answer');
        return Array.from(views).map(v => [v.querySelector('h4').textContent, v.querySelector('.text').textContent,
            v.dataset.finish || '', Array.from(v.querySelectorAll('.tok')).map(t => Number(t.dataset.js))]);""")


def api(server, body):
    r = requests.post(server.base + "/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def test_page_headers_forbid_inline_and_foreign_code(server):
    r = requests.get(server.url + "/")
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert "http" not in r.text.replace(server.url, "")  # nothing from another origin
    for path in ("/ui/app.js", "/ui/style.css"):
        assert requests.get(server.url + path).status_code == 200


def test_a_message_streams(browser, server):
    open_page(browser, server)
    settings(browser, max_tokens=80)
    send(browser, "Tell me a story about a dragon.")
    lengths = set()
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline and not (finished(browser) and lengths):
        text = answers(browser)[0][1] if answers(browser) else ""
        if text:
            lengths.add(len(text))
        time.sleep(0.02)
    wait(browser, lambda: finished(browser))
    label, text, finish, _ = answers(browser)[0]
    assert text and finish in ("stop", "length")
    assert len(lengths) >= 2  # seen while it was arriving, not only at the end


def test_stop_cancels_on_the_server(browser, server):
    cancelled_before = metric(server, "sda_generations_cancelled_total")
    open_page(browser, server)
    settings(browser)  # no max tokens: it would run on to EOS or the end of the context
    send(browser, "Write a very long story about a journey across the sea, with many chapters.")
    wait(browser, lambda: answers(browser) and len(answers(browser)[0][1]) > 20)
    browser.find_element(By.ID, "stop").click()
    wait(browser, lambda: finished(browser))
    assert answers(browser)[0][2] == "stopped"

    # the server heard the stop: it counted the generation as cancelled (not ended by EOS) and freed the slot
    wait(browser, lambda: metric(server, "sda_generations_cancelled_total") == cancelled_before + 1, timeout=60)
    wait(browser, lambda: metric(server, "sda_slots_busy") == 0, timeout=60)


def test_compare_mode_and_per_token_shading_match_the_server(browser, server):
    open_page(browser, server)
    settings(browser, align="helpfulness", amplifier="strength", strength=1.5, compare=True, seed=5, max_tokens=40)
    query = "How can I sleep better?"
    send(browser, query)
    wait(browser, lambda: finished(browser))
    (label_a, text_a, _, js_a), (label_b, text_b, _, js_b) = answers(browser)
    assert (label_a, label_b) == ("Prompting alone", "SDA")
    assert text_a and text_b and text_a != text_b
    body = {"messages": [{"role": "user", "content": query}], "seed": 5, "max_tokens": 40,
            "sda": {"align": "helpfulness", "strength": 1.5, "temperature_mode": "fixed", "token_stats": True}}
    server_tokens = api(server, body)["sda"]["tokens"]
    assert js_b == [t["js"] for t in server_tokens]  # the page shows the server's own figures, token by token
    shaded = js(browser, """
        const toks = document.querySelectorAll('#messages .message.assistant:last-child .answer:last-child .tok');
        return Array.from(toks).map(t => [Number(t.dataset.js), t.style.backgroundColor, t.title]);""")
    assert all(title.startswith("JS ") and " · T " in title for _, _, title in shaded)
    assert all(bg for value, bg, _ in shaded if value > 0.01)  # a divergent token is shaded


def test_judging_block_shows_the_judges_a(browser, server):
    open_page(browser, server)
    settings(browser, align="helpfulness", amplifier="judge", seed=3, max_tokens=24)
    query = "What is a good breakfast?"
    send(browser, query)
    wait(browser, lambda: finished(browser))
    block = browser.find_element(By.CSS_SELECTOR, "#messages .message.assistant:last-child details.judging")
    shown_a = float(block.get_attribute("data-amplifier"))
    report = api(server, {"messages": [{"role": "user", "content": query}], "seed": 3, "max_tokens": 24,
                          "sda": {"align": "helpfulness", "judge": "server", "temperature_mode": "fixed",
                                  "token_stats": True}})["sda"]
    assert report["amplifier_source"] == "judge" and shown_a == report["amplifier"]
    summary = block.find_element(By.TAG_NAME, "summary").text
    shown = float(summary.rsplit("a = ", 1)[1])
    assert abs(shown - report["amplifier"]) <= 0.005 * max(1.0, abs(report["amplifier"]))  # 3 digits
    block.find_element(By.TAG_NAME, "summary").click()
    assert "judge" in block.find_element(By.TAG_NAME, "pre").text


def test_a_reload_keeps_the_conversation(browser, server):
    open_page(browser, server)
    settings(browser, max_tokens=12)
    send(browser, "Say hello to Ada.")
    wait(browser, lambda: finished(browser))
    before = answers(browser)[0][1]
    open_page(browser, server, fresh=False)
    users = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#messages .message.user")]
    assert users == ["Say hello to Ada."] and answers(browser)[0][1] == before
    assert len(browser.find_elements(By.CSS_SELECTOR, "#conversations li")) == 1


def test_model_text_with_markup_is_shown_as_text(browser, server):
    open_page(browser, server)
    hostile = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2"><b>bold</b>'
    conversation = [{"id": "c1", "title": "t", "messages": [
        {"role": "user", "content": hostile},
        {"role": "assistant", "answers": [
            {"label": "Answer", "content": hostile, "tokens": None, "judging": {"text": hostile}, "sda": None,
             "finish": "stop", "error": None},
            {"label": "SDA", "content": hostile, "tokens": [{"text": hostile, "js": 0.2, "temperature": 0.6,
                                                             "prompt_top": hostile}],
             "judging": None, "sda": None, "finish": "stop", "error": None}]}]}]
    js(browser, "localStorage.setItem('sda-local/conversations', arguments[0]);"
                "localStorage.setItem('sda-local/current', 'c1');", json.dumps(conversation))
    open_page(browser, server, fresh=False)
    texts = [a[1] for a in answers(browser)]
    assert texts == [hostile, hostile]
    assert browser.find_element(By.CSS_SELECTOR, "#messages .message.user").text == hostile
    assert not browser.find_elements(By.CSS_SELECTOR, "#messages script, #messages img, #messages b")
    assert js(browser, "return window.__pwned === undefined")
    # and text the real model streams goes the same way: the user's markup comes back as text
    settings(browser, max_tokens=16)
    send(browser, "Repeat exactly: <b>hi</b> <script>window.__pwned=3</script>")
    wait(browser, lambda: finished(browser))
    assert not browser.find_elements(By.CSS_SELECTOR, "#messages script, #messages b")
    assert js(browser, "return window.__pwned === undefined")


def test_api_key_is_asked_once_and_kept_for_the_session(browser, model_path):
    with ServerProcess("--model", str(model_path), "--api-key", "s3cret", "--threads", "2", "--parallel", "1") as s:
        browser.get(s.url + "/")
        js(browser, "localStorage.clear(); sessionStorage.clear();")
        browser.get(s.url + "/")
        wait(browser, lambda: browser.find_element(By.ID, "key-panel").is_displayed())
        browser.find_element(By.ID, "api-key").send_keys("s3cret")
        browser.find_element(By.ID, "save-key").click()
        wait(browser, lambda: js(browser, "return document.body.dataset.ready") == "true")
        browser.get(s.url + "/")  # a reload: the key is still there for this session
        wait(browser, lambda: js(browser, "return document.body.dataset.ready") == "true")
        assert not browser.find_element(By.ID, "key-panel").is_displayed()
        settings(browser, max_tokens=6)
        send(browser, "Hi")
        wait(browser, lambda: finished(browser))
        assert answers(browser)[0][1] and answers(browser)[0][2] in ("stop", "length")
