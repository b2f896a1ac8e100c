"""Starts real `turbine serve` processes for the SDK tests and stops them after."""

import json
import os
import subprocess
import time
import urllib.error
import urllib.request

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
    etcd, discovery = start_etcd(tmp_path_factory.mktemp("etcd"))
    worker = None
    try:
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

def wait_for_port(port, what, timeout=10):
    import socket

    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start")
            time.sleep(0.02)


def start_etcd(data_dir):
    etcd_bin = os.path.join(ROOT, "target", "tools", "etcd")
    if not os.path.exists(etcd_bin):
        raise RuntimeError(f"{etcd_bin} is missing: run scripts/install-etcd")
    client, peer = free_port(), free_port()
    client_url, peer_url = f"http://127.0.0.1:{client}", f"http://127.0.0.1:{peer}"
    etcd = subprocess.Popen(
        [etcd_bin, "--data-dir", str(data_dir),
         "--listen-client-urls", client_url, "--advertise-client-urls", client_url,
         "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
         "--initial-cluster", f"default={peer_url}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    wait_for_port(client, "etcd")
    return etcd, f"etcd://127.0.0.1:{client}"


class LlamaServer:
    """llama.cpp's own server on the test model, on a port of its own."""

    def __init__(self, port=None):
        binary = os.environ.get("LLAMA_SERVER")
        if not binary or not os.path.exists(binary):
            raise RuntimeError(f"LLAMA_SERVER={binary!r} is missing: run scripts/install-llama-server")
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # Two slots, one thread each: two servers share this machine's two cores.
        self.proc = subprocess.Popen(
            [binary, "-m", GGUF, "--alias", "smollm2", "--host", "127.0.0.1", "--port", str(self.port),
             "-np", "2", "-c", "4096", "-t", "1", "-tb", "1", "--metrics", "--no-webui"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError("llama-server did not start")
            time.sleep(0.1)

    def post(self, path, body):
        req = urllib.request.Request(self.url + path, json.dumps(body).encode(), {"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())

    def kill(self):
        self.proc.kill()
        self.proc.wait()


class LlamaCluster:
    """Two llama-servers, a `turbine worker --engine llamacpp` in front of each, and a
    `turbine frontend` routing `kv` (approximate mode: llama.cpp publishes no KV events),
    all found through etcd."""

    def __init__(self, tmp):
        self.etcd, self.discovery = start_etcd(tmp)
        self.engines, self.workers = [], {}
        try:
            for _ in range(2):
                engine = LlamaServer()
                self.engines.append(engine)
                self.start_worker(engine)
            self.frontend = start("--discovery", self.discovery, "--router-mode", "kv", command="frontend")
            self.wait_instances(2)
        except BaseException:
            self.stop()
            raise

    def start_worker(self, engine):
        worker = subprocess.Popen(
            [BINARY, "worker", "--engine", "llamacpp", "--engine-url", engine.url, "--discovery", self.discovery,
             "--engine-poll-ms", "100"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        line = worker.stdout.readline()
        if not line.startswith("turbine: worker "):
            worker.kill()
            raise RuntimeError(f"worker did not start: {line!r}")
        self.workers[engine.port] = (worker, line.split()[2])

    def instances(self):
        try:
            with urllib.request.urlopen(self.frontend.url + "/health", timeout=5) as r:
                body = json.loads(r.read())
        except urllib.error.HTTPError as e:
            body = json.loads(e.read())
        return body["models"].get("smollm2", {}).get("instances", [])

    def wait_instances(self, n, timeout=30):
        deadline = time.monotonic() + timeout
        while len(self.instances()) != n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"expected {n} instances, have {self.instances()}")
            time.sleep(0.05)

    def stop(self):
        if getattr(self, "frontend", None):
            self.frontend.stop()
        for worker, _ in self.workers.values():
            worker.terminate()
        for worker, _ in self.workers.values():
            try:
                worker.wait(timeout=10)
            except subprocess.TimeoutExpired:
                worker.kill()
        for engine in self.engines:
            engine.kill()
        self.etcd.kill()
        self.etcd.wait()


@pytest.fixture(scope="session")
def llamacpp(tmp_path_factory):
    cluster = LlamaCluster(tmp_path_factory.mktemp("etcd-llamacpp"))
    yield cluster
    cluster.stop()
