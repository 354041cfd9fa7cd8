"""The chat page in a real browser: headless Chromium (Debian's chromium and chromium-driver) driven by
Selenium types messages, and the streamed answers it shows equal the API's greedy answers."""

import shutil
import threading
import time
from pathlib import Path

import pytest
from test_serve_api import base_checkpoint, chat_checkpoint, serving  # noqa: F401 - fixtures

webdriver = pytest.importorskip(
    "selenium.webdriver", reason="selenium is not installed (pip install selenium)"
)
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

WAIT_SECONDS = 30


@pytest.fixture(scope="module")
def browser():
    driver_path = shutil.which("chromedriver") or (
        "/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists() else None
    )
    if driver_path is None:
        pytest.skip(
            "NO BROWSER: chromedriver is not installed, so the chat page is untested here; install Debian's "
            "chromium and chromium-driver (apt-get install chromium chromium-driver; .ci/run does)"
        )
    options = webdriver.ChromeOptions()
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(argument)
    for binary in ("/usr/bin/chromium", "/usr/bin/chromium-browser"):
        if Path(binary).exists():
            options.binary_location = binary
            break
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path), options=options)
    yield driver
    driver.quit()


def set_value(browser, element_id: str, value) -> None:
    element = browser.find_element(By.ID, element_id)
    element.clear()
    element.send_keys(str(value))


def say(browser, text: str) -> str:
    """Type `text`, press Enter, wait for the streamed answer to finish; return its text."""
    before = len(browser.find_elements(By.CSS_SELECTOR, ".message.assistant"))
    browser.find_element(By.ID, "message").send_keys(text, Keys.ENTER)
    wait = WebDriverWait(browser, WAIT_SECONDS)
    wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".message.assistant[data-done=true]")) > before)
    answer = browser.find_elements(By.CSS_SELECTOR, ".message.assistant")[-1]
    assert "error" not in answer.get_attribute("class"), answer.text
    return answer.find_element(By.CSS_SELECTOR, ".text").get_attribute("textContent")


def open_page(browser, server, temperature=0, max_tokens=12) -> None:
    browser.get(server.url + "/")
    WebDriverWait(browser, WAIT_SECONDS).until(lambda b: b.find_element(By.ID, "model-name").text)
    set_value(browser, "temperature", temperature)
    set_value(browser, "max-tokens", max_tokens)


def test_the_page_streams_the_apis_greedy_chat_answers(browser, chat_checkpoint):
    with serving(chat_checkpoint) as server:
        open_page(browser, server, max_tokens=6)  # two turns fit the tiny model's context of 64
        assert (
            browser.find_element(By.ID, "mode").get_attribute("value") == "chat"
        )  # the checkpoint has a template
        client = server.client()
        first = say(browser, "Sea?")
        messages = [{"role": "user", "content": "Sea?"}]
        expected = client.chat.completions.create(
            model="chat", messages=messages, max_tokens=6, temperature=0
        )
        assert first == expected.choices[0].message.content and first
        second = say(browser, "Sky?")  # the conversation goes on: the history is sent
        messages += [{"role": "assistant", "content": first.strip()}, {"role": "user", "content": "Sky?"}]
        expected = client.chat.completions.create(
            model="chat", messages=messages, max_tokens=6, temperature=0
        )
        assert second == expected.choices[0].message.content
        browser.find_element(By.ID, "new-chat").click()
        assert browser.find_elements(By.CSS_SELECTOR, ".message") == []
        assert say(browser, "Sea?") == first  # a new chat starts from nothing


def test_look_inside_shades_each_token_and_lists_its_alternatives(browser, base_checkpoint):
    with serving(base_checkpoint) as server:
        open_page(browser, server, max_tokens=8)
        assert browser.find_element(By.ID, "mode").get_attribute("value") == "completion"  # no template
        browser.find_element(By.ID, "inside").click()
        text = say(browser, "once upon a time")
        expected = server.client().completions.create(
            model="base", prompt="once upon a time", max_tokens=8, temperature=0
        )
        assert text == expected.choices[0].text
        tokens = browser.find_elements(By.CSS_SELECTOR, ".message.assistant .token")
        assert tokens and "".join(t.get_attribute("textContent") for t in tokens) == text
        info = tokens[0].get_attribute("data-info")
        assert "p = " in info and len(info.splitlines()) >= 1 + 5  # the token and its 5 alternatives
        assert tokens[0].value_of_css_property("background-color") not in ("", "rgba(0, 0, 0, 0)")


def test_stop_ends_the_answer_and_the_server_frees_its_slot(browser, base_checkpoint):
    with serving(base_checkpoint) as server:
        open_page(browser, server, max_tokens=40)
        scheduler = server.app.state.scheduler
        gate, step = threading.Event(), scheduler.step
        # Hold the answer back until Stop is clicked, then let it go slowly (50 ms a step): a stream nobody
        # reads must be cancelled long before its 40 tokens are done.
        scheduler.step = lambda: gate.wait(30) and (time.sleep(0.05) or step())
        browser.find_element(By.ID, "message").send_keys("once upon a time", Keys.ENTER)
        deadline = time.monotonic() + WAIT_SECONDS
        while server.health()["waiting"] < 1:
            assert time.monotonic() < deadline, "the page's request did not arrive"
            time.sleep(0.02)
        browser.find_element(By.ID, "stop").click()
        wait = WebDriverWait(browser, WAIT_SECONDS)
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, ".message.assistant[data-done=true]"))
        assert "(stopped)" in browser.find_element(By.CSS_SELECTOR, ".message.assistant").text
        assert browser.find_element(By.ID, "send").is_enabled()
        gate.set()
        server.wait_idle()  # no slot stays held
        assert scheduler.steps < 20  # the abandoned stream was cancelled, not decoded to its end
