"""The official OpenAI Python SDK against a running `turbine serve`: what users' clients see."""

import http.client
import json
import os
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request

import openai
import pytest


def get(server, path):
    with urllib.request.urlopen(server.url + path, timeout=10) as r:
        return r.read().decode()


def test_models(echo):
    models = echo.client.models.list()
    assert [m.id for m in models.data] == ["echo"]


def test_chat_completion_with_usage(echo):
    r = echo.client.chat.completions.create(
        model="echo", messages=[{"role": "user", "content": "héllo"}], max_completion_tokens=100
    )
    prompt = "user: héllo\nassistant: "
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == prompt
    assert r.choices[0].finish_reason == "stop"
    n = len(prompt.encode())
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (n, n, 2 * n)


def test_chat_stream_with_include_usage(echo):
    stream = echo.client.chat.completions.create(
        model="echo",
        messages=[{"role": "user", "content": "hi 🦀"}],
        stream=True,
        stream_options={"include_usage": True},
        max_tokens=13,
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    # 13 bytes end exactly after the crab's four.
    assert text == "user: hi 🦀"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 13


def test_completions_and_stream(echo):
    r = echo.client.completions.create(model="echo", prompt="abcdef", max_tokens=4)
    assert (r.choices[0].text, r.choices[0].finish_reason) == ("abcd", "length")
    assert r.usage.prompt_tokens == 6
    stream = echo.client.completions.create(model="echo", prompt=[97, 98, 99], stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "abc"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks)


def test_batched_prompts_and_n(echo):
    r = echo.client.completions.create(model="echo", prompt=["ab", "xyz"], n=2, max_tokens=2)
    assert [(c.index, c.text) for c in r.choices] == [(0, "ab"), (1, "ab"), (2, "xy"), (3, "xy")]
    assert r.usage.prompt_tokens == 5 and r.usage.completion_tokens == 8


def test_stop_strings(echo):
    r = echo.client.completions.create(model="echo", prompt="one, two. three", stop=[".", "!"])
    assert (r.choices[0].text, r.choices[0].finish_reason) == ("one, two", "stop")
    stream = echo.client.chat.completions.create(
        model="echo", messages=[{"role": "user", "content": "say STOP now"}], stop="STOP", stream=True
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "user: say "
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_sampling_fields_are_accepted(echo):
    r = echo.client.chat.completions.create(
        model="echo",
        messages=[{"role": "user", "content": "x"}],
        temperature=0.7,
        top_p=0.9,
        seed=-5,
        frequency_penalty=0.5,
        presence_penalty=-0.5,
        extra_body={"top_k": 40, "ignore_eos": True, "stop_token_ids": [7]},
    )
    assert r.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(
    "kwargs,param",
    [
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": -0.1}, "top_p"),
        ({"frequency_penalty": 3}, "frequency_penalty"),
        ({"presence_penalty": -2.5}, "presence_penalty"),
        ({"stop": ["s"] * 33}, "stop"),
        ({"max_tokens": 100000}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"extra_body": {"top_k": -3}}, "top_k"),
        ({"messages": []}, "messages"),
        ({"messages": [{"content": "no role"}]}, "messages[0].role"),
    ],
)
def test_invalid_values_raise_bad_request(echo, kwargs, param):
    args = {"model": "echo", "messages": [{"role": "user", "content": "x"}], **kwargs}
    with pytest.raises(openai.BadRequestError) as e:
        echo.client.chat.completions.create(**args)
    assert e.value.status_code == 400
    assert e.value.body["param"] == param
    assert e.value.body["type"] == "invalid_request_error"


def test_prompt_beyond_context_is_bad_request(echo):
    with pytest.raises(openai.BadRequestError) as e:
        echo.client.completions.create(model="echo", prompt="x" * 600)
    assert e.value.body["param"] == "prompt"


def test_unknown_model_is_not_found(echo):
    with pytest.raises(openai.NotFoundError) as e:
        echo.client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
    assert e.value.body["code"] == "model_not_found"


def test_body_over_limit_is_413(echo):
    with pytest.raises(openai.APIStatusError) as e:
        echo.client.completions.create(model="echo", prompt="x" * 70000)
    assert e.value.status_code == 413


def test_malformed_json_is_400(echo):
    request = urllib.request.Request(
        echo.url + "/v1/chat/completions", data=b'{"model": ', headers={"content-type": "application/json"}
    )
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=10)
    assert e.value.code == 400
    assert "not valid JSON" in json.loads(e.value.read())["error"]["message"]


def test_disconnect_is_counted(echo):
    before = metric(echo, 'turbine_frontend_client_disconnects_total{endpoint="chat",model="echo"}')
    conn = http.client.HTTPConnection(urllib.parse.urlsplit(echo.url).netloc, timeout=10)
    body = {"model": "echo", "messages": [{"role": "user", "content": "z" * 300}], "stream": True}
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"content-type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200 and r.readline().startswith(b"data: ")
    conn.close()
    # The frontend notices on its next write, within a few tokens.
    for _ in range(200):
        if metric(echo, 'turbine_frontend_client_disconnects_total{endpoint="chat",model="echo"}') > before:
            break
        time.sleep(0.01)
    else:
        raise AssertionError("disconnect not counted")


def metric(server, series):
    for line in get(server, "/metrics").splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return 0.0


def test_metrics_pass_promtool(echo):
    echo.client.completions.create(model="echo", prompt="warm up")
    text = get(echo, "/metrics")
    assert "turbine_frontend_time_to_first_token_seconds_bucket" in text
    promtool = os.environ.get("PROMTOOL", "promtool")
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_real_chat_template(smol):
    r = smol.client.chat.completions.create(
        model="smol", messages=[{"role": "user", "content": "Bonjour 🦀"}], extra_body={"ignore_eos": True}
    )
    # SmolLM2's template adds its default system prompt; special tokens are not shown.
    assert r.choices[0].message.content == (
        "system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face\n"
        "user\nBonjour 🦀\nassistant\n"
    )
    assert r.usage.prompt_tokens == r.usage.completion_tokens
    # Without ignore_eos, the echo ends at the template's first <|im_end|>, an end token.
    r = smol.client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Bonjour"}])
    assert r.choices[0].message.content.endswith("trained by Hugging Face")
    assert r.choices[0].finish_reason == "stop"


def test_no_workers_is_service_unavailable(orphaned):
    # The model is known but its last worker has gone: 503, which clients may retry.
    for _ in range(100):
        try:
            orphaned.client.completions.create(model="echo", prompt="x")
        except openai.InternalServerError as e:
            assert e.status_code == 503
            assert "no worker" in e.body["message"]
            return
        time.sleep(0.05)
    raise AssertionError("requests still succeed after the worker stopped")
