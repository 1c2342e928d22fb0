"""`lmforge serve` as a user runs it: listening at once, 503 while loading, answers, drains on SIGTERM;
split over processes, it fails fast when one of them dies."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai

from lmforge.cli import main


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


LMFORGE = (sys.executable, "-m", "lmforge.cli")


def start_server(*flags: str, launcher: tuple[str, ...] = LMFORGE) -> tuple[subprocess.Popen, str, list[int]]:
    """`lmforge serve FLAGS` on a free port (run by `launcher`); returns once /health says 200 (with every
    status seen)."""
    port = free_port()
    process = subprocess.Popen([*launcher, "serve", "--port", str(port), "--kv-cache-tokens", "2048",
                                "--max-model-len", "512", *flags],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"} if launcher != LMFORGE else None)
    url, statuses = f"http://127.0.0.1:{port}", []
    deadline = time.time() + 120
    while time.time() < deadline and (not statuses or statuses[-1] != 200) and process.poll() is None:
        try:
            statuses.append(httpx.get(url + "/health", timeout=2).status_code)
        except httpx.TransportError:  # not listening yet
            pass
        time.sleep(0.05)
    return process, url, statuses


def test_serve_loads_answers_and_drains_on_sigterm():
    process, url, statuses = start_server("--api-key", "k", "--cors-origin", "http://example.org")
    try:
        assert statuses[-1] == 200 and set(statuses) <= {503, 200}
        preflight = httpx.options(url + "/v1/chat/completions", headers={
            "Origin": "http://example.org", "Access-Control-Request-Method": "POST"})
        assert preflight.headers["access-control-allow-origin"] == "http://example.org"
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0}
        assert httpx.post(url + "/v1/chat/completions", json=body).status_code == 401
        answer = httpx.post(url + "/v1/chat/completions", json=body, headers={"Authorization": "Bearer k"})
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 3
        embedding = httpx.post(url + "/v1/embeddings", json={"input": "hello"}, headers={"Authorization": "Bearer k"})
        assert len(embedding.json()["data"][0]["embedding"]) == 384
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    assert f"serving smollm2-135m-instruct on {url}/" in stderr


def test_sigterm_lets_requests_in_flight_run_until_the_drain_timeout():
    process, url, _ = start_server("--embedding-model", "none", "--drain-timeout", "5")
    body = {"messages": [{"role": "user", "content": "Tell a long story."}], "max_completion_tokens": 400,
            "ignore_eos": True, "stream": True}
    received = []
    try:
        preflight = httpx.options(url + "/v1/chat/completions", headers={
            "Origin": "http://example.org", "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in preflight.headers  # CORS is off unless asked for
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            received.append(next(lines))
            start = time.time()
            process.send_signal(signal.SIGTERM)
            try:
                for line in lines:  # the answer keeps streaming while the server drains
                    received.append(line)
            except httpx.HTTPError:
                pass  # cut at the drain timeout
        assert len([line for line in received if line.startswith("data: ")]) > 5
        assert process.wait(timeout=60) == 0 and time.time() - start < 30
    finally:
        process.kill()


def test_serve_help_lists_the_options(capsys):
    try:
        main(["serve", "--help"])
    except SystemExit as exit:
        assert exit.code == 0
    out = capsys.readouterr().out
    for flag in ("--api-key", "--max-queue", "--kv-cache-tokens", "--max-num-seqs", "--drain-timeout"):
        assert flag in out


def test_a_model_that_cannot_load_ends_the_server_with_one_line():
    result = subprocess.run([sys.executable, "-m", "lmforge.cli", "serve", "--model", "/no/such/model", "--port",
                             str(free_port())], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "lmforge: error: model '/no/such/model' not found" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_quantized_server_still_answers():
    process, url, statuses = start_server("--quantization", "int8", "--embedding-model", "none", "--dtype",
                                          "float32")
    try:
        assert statuses[-1] == 200
        # Germany: on France the first answer token is a near tie that int8-rounded activations tip (test_apply)
        body = {"messages": [{"role": "user", "content": "What is the capital of Germany?"}], "max_tokens": 8,
                "temperature": 0}
        answer = httpx.post(url + "/v1/chat/completions", json=body, timeout=60).json()
        assert "Berlin" in answer["choices"][0]["message"]["content"]
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    assert "ready (float32, int8)" in stderr


def spawned_children(pid: int) -> list[int]:
    """The processes `pid` started with multiprocessing's spawn (its tensor-parallel workers)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            command = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError):
            continue  # gone meanwhile
        if parent == pid and b"spawn_main" in command:
            found.append(int(stat.parent.name))
    return found


def is_running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; only its exit status is left to collect


def test_a_tensor_parallel_server_answers_and_fails_fast_when_a_worker_dies():
    """SmolLM2 split over 3 processes answers the openai client; killing a worker stops the server with a
    clear one-line error and a non-zero status, leaving no process behind."""
    process, url, statuses = start_server("--tensor-parallel-size", "3", "--embedding-model", "none", "--dtype",
                                          "float32")
    try:
        assert statuses[-1] == 200
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(model="smollm2-135m-instruct", max_tokens=8, temperature=0,
                                               messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert "Paris" in reply.choices[0].message.content
        workers = spawned_children(process.pid)
        assert len(workers) == 2
        os.kill(workers[0], signal.SIGKILL)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 2
    assert "lmforge: error: tensor-parallel worker rank" in stderr and "has exited" in stderr
    assert "Traceback" not in stderr
    deadline = time.time() + 10
    while any(is_running(pid) for pid in workers) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(is_running(pid) for pid in workers)


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, IndexError):
            continue  # gone meanwhile
    return found


def test_serve_under_torchrun_answers_from_rank_0_and_the_job_ends_together(tiny_chat_model):
    """Two torchrun processes split the model: rank 0 serves HTTP, rank 1 is its worker; stopping the job
    (SIGTERM to torchrun, which passes it on) stops both."""
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "lmforge.cli")
    process, url, statuses = start_server("--model", str(tiny_chat_model), "--tensor-parallel-size", "2",
                                          "--embedding-model", "none", "--dtype", "float32", launcher=torchrun)
    try:
        assert statuses and statuses[-1] == 200, process.communicate(timeout=30)[1][-3000:]
        ranks = children(process.pid)
        assert len(ranks) == 2
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "temperature": 0}
        answer = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 5
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert "/lmforge/" not in stderr, stderr[-3000:]  # no lmforge frame in a traceback (torchrun prints its own)
    deadline = time.time() + 10
    while any(is_running(pid) for pid in ranks) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(is_running(pid) for pid in ranks)


def test_serve_under_torchrun_needs_the_jobs_size_as_the_split(tiny_chat_model):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "lmforge.cli", "serve", "--model", str(tiny_chat_model), "--embedding-model", "none"]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=120,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert finished.returncode != 0
    assert "torchrun started 2 processes; pass --tensor-parallel-size 2" in finished.stderr
