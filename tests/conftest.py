"""Session-scoped real models: each is loaded once per test run, however many tests use it."""

from pathlib import Path

import pytest
import torch

from lmforge.sources import resolve


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return resolve("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smollm2():
    """lmforge's SmolLM2-135M-Instruct (from the embedded Q4_1 GGUF, dequantized to fp32)."""
    from lmforge import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from lmforge import AutoTokenizer

    return AutoTokenizer.from_pretrained("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_path):
    """The reference: HF transformers loading the same GGUF file (fp32)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name,
                                                 dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def hf_smollm2_tokenizer(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name)


@pytest.fixture(scope="session")
def minilm_encoder():
    """lmforge's all-MiniLM-L6-v2 sentence encoder (the default embedding model of RAG indexes)."""
    from lmforge.context.rag import SentenceEncoder

    return SentenceEncoder.from_pretrained("all-minilm-l6-v2")


@pytest.fixture(scope="session")
def browser():
    """A real headless Chromium (Debian's chromium and chromium-driver, driven by selenium: nothing downloaded),
    keeping the page's console messages (browser.get_log("browser"))."""
    import shutil

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver, "browser tests need Debian's chromium and chromium-driver: run `make setup`"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(service=Service(driver), options=options)
    yield browser
    browser.quit()
