"""A real server on a loopback port over the session's SmolLM2 and the embedded MiniLM encoder."""

import socket
import threading
import time

import openai
import pytest
import uvicorn

from lmforge import EngineConfig, LLMEngine
from lmforge.engine.async_engine import AsyncLLMEngine
from lmforge.serve.app import ServerState, create_app
from lmforge.serve.embeddings import Embedder

MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="package")
def server(smollm2, smollm2_tokenizer):
    engine = AsyncLLMEngine(LLMEngine(smollm2, smollm2_tokenizer, EngineConfig(kv_cache_tokens=8192, max_model_len=512,
                                                                               max_num_seqs=32)))
    state = ServerState(MODEL, engine, embedder=Embedder.from_pretrained("all-minilm-l6-v2"))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    uvicorn_server = uvicorn.Server(uvicorn.Config(create_app(state), log_level="warning"))
    thread = threading.Thread(target=uvicorn_server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not uvicorn_server.started:
        time.sleep(0.05)
    state.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    yield state
    uvicorn_server.should_exit = True
    thread.join()
    engine.shutdown()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def wait_for_free_blocks(server, timeout=10.0) -> None:
    deadline = time.time() + timeout
    while server.engine.stats.kv_blocks_used and time.time() < deadline:
        time.sleep(0.05)
    assert server.engine.stats.kv_blocks_used == 0 and not server.engine.engine.requests
