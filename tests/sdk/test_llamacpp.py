"""The OpenAI SDK against `turbine frontend` with two `turbine worker --engine llamacpp` in
front of llama.cpp's own server: what users of an external engine see."""

import json
import threading
import time
import urllib.request

import openai
import pytest

from conftest import LlamaServer

MODEL = "smollm2"


def test_models_come_from_the_server(llamacpp):
    assert [m.id for m in llamacpp.frontend.client.models.list().data] == [MODEL]


def test_chat_completion_with_usage(llamacpp):
    r = llamacpp.frontend.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=24,
        temperature=0,
    )
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    assert 0 < r.usage.completion_tokens <= 24
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_with_include_usage(llamacpp):
    stream = llamacpp.frontend.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Count to ten."}], stream=True,
        stream_options={"include_usage": True}, max_tokens=12, extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    # llama.cpp's own limit sometimes stops one token short when its slot reuses part of a
    # cached prompt (seen once: 11 of 12 with 24 of 34 prompt tokens cached, its stop_type
    # "limit"); the worker passes on the server's finish as it comes.
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens in (11, 12)


def test_completions_n_and_stop_strings(llamacpp):
    client = llamacpp.frontend.client
    r = client.completions.create(model=MODEL, prompt=["The sky is", "Water is"], max_tokens=6, n=2, seed=7)
    assert len(r.choices) == 4 and all(c.finish_reason in ("stop", "length") for c in r.choices)
    greedy = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=16, temperature=0)
    text = greedy.choices[0].text
    # The greedy continuation counts on, so it has commas; with one as a stop string the text
    # ends before the first.
    assert "," in text, text
    r = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=16, temperature=0, stop=[","])
    assert r.choices[0].text == text[: text.index(",")]
    assert r.choices[0].finish_reason == "stop"


def test_sampling_fields_map_and_bad_values_are_refused(llamacpp):
    client = llamacpp.frontend.client
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=5, temperature=0.7, top_p=0.9,
        seed=3, frequency_penalty=0.5, presence_penalty=0.5, extra_body={"top_k": 20},
    )
    again = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=5, temperature=0.7, top_p=0.9,
        seed=3, frequency_penalty=0.5, presence_penalty=0.5, extra_body={"top_k": 20},
    )
    # Same seed, same answer, whichever server took it.
    assert r.choices[0].message.content == again.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], temperature=3)
    assert e.value.body["param"] == "temperature"
    # A seed llama.cpp cannot hold is refused by name, not dropped.
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=2, seed=2**33)
    assert "seed" in e.value.message


def test_greedy_output_equals_the_servers_own(llamacpp):
    client = llamacpp.frontend.client
    prompt = llamacpp.engines[0].post("/tokenize", {"content": "The capital of France is"})["tokens"]
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    direct = llamacpp.engines[0].post(
        "/completion", {"prompt": prompt, "n_predict": 24, "temperature": 0, "ignore_eos": True, "cache_prompt": False}
    )
    assert r.choices[0].text == direct["content"]
    assert r.usage.completion_tokens == direct["tokens_predicted"] == 24


def test_serve_fronts_the_same_servers_in_one_process(llamacpp):
    from conftest import start

    urls = [a for e in llamacpp.engines for a in ("--engine-url", e.url)]
    server = start("--engine", "llamacpp", *urls, "--router-mode", "kv")
    try:
        assert [m.id for m in server.client.models.list().data] == [MODEL]
        r = server.client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 4
    finally:
        server.stop()
    # One worker per server: a different count is refused with the reason.
    import subprocess

    from conftest import BINARY

    bad = subprocess.run([BINARY, "serve", "--engine", "llamacpp", "--workers", "3", *urls], capture_output=True, text=True)
    assert bad.returncode != 0 and "one worker per server" in bad.stderr


def test_killing_an_engine_mid_stream_migrates_and_its_worker_comes_back(llamacpp):
    """Last in this module: it kills one server and starts it again on the same port."""
    client = llamacpp.frontend.client
    messages = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
    expected = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=120, temperature=0, extra_body={"ignore_eos": True}
    ).choices[0].message.content
    before = migrations(llamacpp)
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=messages, max_tokens=120, temperature=0, stream=True, extra_body={"ignore_eos": True},
    )
    worker = raw.headers["x-turbine-worker"]
    stream = raw.parse()
    victim = next(e for e in llamacpp.engines if llamacpp.workers[e.port][1] == worker)
    text, finishes = "", []
    for i, chunk in enumerate(stream):
        if i == 5:
            victim.kill()
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            if chunk.choices[0].finish_reason:
                finishes.append(chunk.choices[0].finish_reason)
    assert finishes == ["length"]
    assert migrations(llamacpp) == before + 1
    # Greedy on the other server from the prompt plus the tokens so far: the same story.
    assert text == expected
    # The dead server's worker left discovery; back on its port, it registers again.
    llamacpp.wait_instances(1)
    llamacpp.engines[llamacpp.engines.index(victim)] = LlamaServer(port=victim.port)
    llamacpp.wait_instances(2)
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=3)
    assert r.choices[0].finish_reason in ("stop", "length")


def migrations(cluster):
    with urllib.request.urlopen(cluster.frontend.url + "/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("turbine_frontend_migrations_total") and MODEL in line:
                return float(line.split()[-1])
    return 0.0
