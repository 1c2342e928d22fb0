"""The web chat page in a real headless Chromium: send a message, watch the answer stream in, stop one.

Needs Debian's `chromium` and `chromium-driver` (installed by `make test`); selenium drives the
installed driver directly, so nothing is downloaded.
"""

from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests.serve.conftest import wait_for_free_blocks


def ask(browser, text: str) -> None:
    box = browser.find_element(By.ID, "input")
    box.clear()
    box.send_keys(text)
    browser.find_element(By.ID, "send").click()


def assistant_texts(browser) -> list[str]:
    return [element.text for element in browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")]


def test_a_message_streams_back_with_live_figures(server, browser):
    browser.get(server.url + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda b: b.find_element(By.ID, "model").text == server.model_name)  # /stats answered
    browser.find_element(By.ID, "temperature").clear()
    browser.find_element(By.ID, "temperature").send_keys("0")
    ask(browser, "What is the capital of France?")
    wait.until(lambda b: b.find_element(By.ID, "send").is_enabled() and assistant_texts(b)[-1])
    assert "Paris" in assistant_texts(browser)[-1]
    assert browser.find_element(By.ID, "ttft").text.endswith(" s")
    assert int(browser.find_element(By.ID, "tokens").text) > 0
    ask(browser, "And of Italy?")  # a second turn carries the history
    wait.until(lambda b: len(assistant_texts(b)) == 2 and b.find_element(By.ID, "send").is_enabled())
    assert "Rome" in assistant_texts(browser)[-1]


def test_stop_aborts_the_answer_and_frees_the_cache(server, browser):
    browser.get(server.url + "/")
    browser.find_element(By.ID, "max-tokens").clear()
    browser.find_element(By.ID, "max-tokens").send_keys("400")
    ask(browser, "Write a very long story about a dragon who learns to cook.")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda b: len(assistant_texts(b)[-1]) > 20)  # streaming has begun
    browser.find_element(By.ID, "stop").click()
    wait.until(lambda b: b.find_element(By.ID, "send").is_enabled())
    stopped = assistant_texts(browser)[-1]
    wait_for_free_blocks(server)
    assert assistant_texts(browser)[-1] == stopped  # nothing arrives after Stop
