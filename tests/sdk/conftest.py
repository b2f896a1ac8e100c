"""Starts real `turbine serve` processes for the SDK tests and stops them after."""

import os
import subprocess
import time

import openai
import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BINARY = os.environ.get("TURBINE_BIN", os.path.join(ROOT, "target", "debug", "turbine"))


class Server:
    def __init__(self, *args, command="serve"):
        self.proc = subprocess.Popen(
            [BINARY, command, "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        line = self.proc.stdout.readline()
        prefix = "turbine: listening on "
        if not line.startswith(prefix):
            self.proc.kill()
            raise RuntimeError(f"turbine serve did not start: {line!r}")
        self.url = line[len(prefix):].strip()
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=30)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


def start(*args, command="serve"):
    server = Server(*args, command=command)
    # Workers register asynchronously: wait until the model is listed.
    deadline = time.monotonic() + 10
    while not server.client.models.list().data:
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError("no model registered within 10 s")
        time.sleep(0.02)
    return server


@pytest.fixture(scope="session")
def echo():
    """Echo workers with the byte-level tokenizer: replies repeat the prompt, one byte per token."""
    server = start("--engine", "echo", "--echo-delay-ms", "1", "--context-length", "512", "--max-body-bytes", "65536")
    yield server
    server.stop()


GGUF = os.path.join(ROOT, "target", "test-models", "smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def smol():
    """Echo workers behind SmolLM2-135M-Instruct's own tokenizer and chat template."""
    if not os.path.exists(GGUF):
        raise RuntimeError(f"{GGUF} is missing: run scripts/fetch-test-models")
    server = start("--engine", "echo", "--echo-delay-ms", "0", "--tokenizer", GGUF, "--model-name", "smol")
    yield server
    server.stop()


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def orphaned(tmp_path_factory):
    """A frontend process whose only worker process (found through etcd) has stopped."""
    etcd_bin = os.path.join(ROOT, "target", "tools", "etcd")
    if not os.path.exists(etcd_bin):
        raise RuntimeError(f"{etcd_bin} is missing: run scripts/install-etcd")
    client, peer = free_port(), free_port()
    client_url, peer_url = f"http://127.0.0.1:{client}", f"http://127.0.0.1:{peer}"
    etcd = subprocess.Popen(
        [etcd_bin, "--data-dir", str(tmp_path_factory.mktemp("etcd")),
         "--listen-client-urls", client_url, "--advertise-client-urls", client_url,
         "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
         "--initial-cluster", f"default={peer_url}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    discovery = f"etcd://127.0.0.1:{client}"
    worker = None
    try:
        import socket

        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", client), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("etcd did not start")
                time.sleep(0.02)
        worker = subprocess.Popen(
            [BINARY, "worker", "--engine", "echo", "--discovery", discovery], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        if not worker.stdout.readline().startswith("turbine: worker "):
            raise RuntimeError("worker did not start")
        frontend = start("--discovery", discovery, command="frontend")
        worker.terminate()
        worker.wait(timeout=10)
        yield frontend
        frontend.stop()
    finally:
        if worker and worker.poll() is None:
            worker.kill()
        etcd.kill()
        etcd.wait()
