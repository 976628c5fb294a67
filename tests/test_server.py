"""`flashlm serve` over loopback: the official openai client (streaming and not), raw HTTP for what a
client library never sends, and the queue / cancellation behaviour with a model whose every forward pass
waits for the test's permission (so nothing depends on timing)."""
import contextlib
import http.client
import json
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import openai
import pytest

import tiny_models as tm
from flashlm.converters.convert import convert
from flashlm.runtime.engine import Engine
from flashlm.runtime.generate import GenerationStats, stream_generate
from flashlm.runtime.model import Model
from flashlm.runtime.modelfile import open_folder
from flashlm.runtime.sampling import SamplingParams
from flashlm.runtime.server import HttpServer, ServerSettings
from flashlm.runtime.tokenizer import Tokenizer

WAIT = 120           # seconds: an upper bound for anything to happen, never a measured duration
BODY_LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    return convert(tm.make_llama(d / "src", tied=True), d / "tiny.flashlm", progress=False)


def load(path):
    f = open_folder(path)
    return Model(f), Tokenizer.from_folder(f.path, f.manifest)


class Gated:
    """The model, except that each forward pass waits for a permit and EOS is never chosen: the test
    decides how many steps happen, and a generation only ends when max_tokens or a cancel ends it."""

    def __init__(self, model):
        self._model = model
        self.permits = threading.Semaphore(0)
        self.calls = 0

    def __getattr__(self, name):
        return getattr(self._model, name)

    def forward(self, tokens, **kw):
        if not self.permits.acquire(timeout=WAIT):
            raise RuntimeError("the test never released this forward pass")
        self.calls += 1
        logits = self._model.forward(tokens, **kw)
        logits[:, tm.EOS] = -np.inf
        return logits

    def release(self, n=1):
        for _ in range(n):
            self.permits.release()


def health(port):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
    conn.request("GET", "/health")
    r = conn.getresponse()
    out = r.status, json.loads(r.read())
    conn.close()
    return out


def wait_for(predicate, what):
    deadline = time.monotonic() + WAIT
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@contextlib.contextmanager
def serving(loader, *, queue=4, ready=True, **settings):
    engine = Engine(loader, queue_size=queue)
    server = HttpServer(engine, ServerSettings(port=0, max_body_bytes=BODY_LIMIT, **settings))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        if ready:
            wait_for(lambda: health(server.port)[0] == 200, "the model to load")
        yield server, engine
    finally:
        server.stop()
        thread.join(WAIT)
        assert not thread.is_alive()


@pytest.fixture(scope="module")
def server(folder):
    with serving(lambda: load(folder)) as (srv, _):
        yield srv


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=WAIT)


def reference(folder, ids, max_tokens, params=SamplingParams(temperature=0.0), stop=()):
    """What the library generates for these ids on a fresh model (no cache shared with the server)."""
    model, tok = load(folder)
    stats = GenerationStats()
    text = "".join(stream_generate(model, tok, ids, params, max_tokens=max_tokens, stop=stop, stats=stats))
    return text, stats


def raw(port, method, path, body=b"", headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
    conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, dict(r.getheaders()), data


MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"}]


# --- the openai client -----------------------------------------------------------------------------------
def test_chat_matches_the_library_and_reports_usage(client, folder):
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, temperature=0)
    _, tok = load(folder)
    ids = tok.encode_chat(MESSAGES)
    text, stats = reference(folder, ids, 8)
    assert r.object == "chat.completion" and r.model == "tiny"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == text
    assert r.choices[0].finish_reason == ("length" if stats.finish_reason == "length" else "stop")
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == stats.gen_tokens
    assert r.usage.total_tokens == len(ids) + stats.gen_tokens
    t = r.model_extra["timings"]
    assert t["prompt_n"] + t["cache_n"] == len(ids) and t["predicted_n"] == stats.gen_tokens


def test_streaming_chat_equals_non_streaming_and_ends_with_usage(client):
    kw = dict(model="tiny", messages=MESSAGES, max_tokens=10, temperature=0)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])
    plain = list(client.chat.completions.create(**kw, stream=True))     # no usage chunk unless asked
    assert plain[-1].choices and plain[-1].choices[0].finish_reason and plain[-1].usage is None


def test_completions_from_text_and_from_token_ids(client, folder):
    _, tok = load(folder)
    ids = tok.encode("The quick brown fox")
    a = client.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=6, temperature=0)
    b = client.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0)
    assert a.object == "text_completion" and a.choices[0].text == b.choices[0].text
    assert a.choices[0].text == reference(folder, ids, 6)[0]
    streamed = list(client.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == a.choices[0].text


def test_seed_makes_sampling_reproducible(client, folder):
    def sample(seed):
        return client.completions.create(model="tiny", prompt="Hello", max_tokens=12, temperature=1.0, seed=seed,
                                         extra_body={"top_k": 50}).choices[0].text
    assert sample(7) == sample(7)
    _, tok = load(folder)
    params = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, seed=7)   # top_p 0.9: the model's default
    assert sample(7) == reference(folder, tok.encode("Hello"), 12, params)[0]
    assert len({sample(s) for s in (1, 2, 3)}) > 1


def test_stop_strings_and_max_tokens(client, folder):
    _, tok = load(folder)
    ids = tok.encode("Numbers 0123")
    full, _ = reference(folder, ids, 16)
    assert len(full) >= 6, "the tiny model's reply is too short to pick a stop string from"
    stop = full[3:5]
    expected = full[:full.find(stop)]
    r = client.completions.create(model="tiny", prompt="Numbers 0123", max_tokens=16, temperature=0, stop=[stop])
    assert r.choices[0].text == expected and r.choices[0].finish_reason == "stop"
    r = client.completions.create(model="tiny", prompt="Numbers 0123", max_tokens=2, temperature=0)
    assert r.usage.completion_tokens == 2 and r.choices[0].finish_reason == "length"


def test_next_turn_reuses_the_conversation_prefix(client, folder):
    first = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6, temperature=0)
    turn2 = MESSAGES + [{"role": "assistant", "content": first.choices[0].message.content},
                        {"role": "user", "content": "and again"}]
    r = client.chat.completions.create(model="tiny", messages=turn2, max_tokens=6, temperature=0)
    _, tok = load(folder)
    ids1, ids2 = tok.encode_chat(MESSAGES), tok.encode_chat(turn2)
    cached = r.usage.prompt_tokens_details.cached_tokens
    assert cached >= len(ids1) and r.model_extra["timings"]["prompt_n"] == len(ids2) - cached
    assert r.choices[0].message.content == reference(folder, ids2, 6)[0]    # reuse changes nothing


def test_models_and_health(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert health(server.port) == (200, {"status": "ok", "running": 0, "queued": 0, "queue_size": 4})


# --- raw HTTP: what a well-behaved client never sends ---------------------------------------------------
def chat_body(**over):
    return {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **over}


@pytest.mark.parametrize("path, body, status, param", [
    ("/v1/chat/completions", b'{"model": "tiny", "messages": [', 400, None),           # malformed JSON
    ("/v1/chat/completions", b'[1, 2]', 400, None),                                     # not an object
    ("/v1/chat/completions", b'\xff\xfe{}', 400, None),                                 # not UTF-8 JSON
    ("/v1/chat/completions", b'{"model": "tiny", "temperature": NaN}', 400, None),      # not JSON
    ("/v1/chat/completions", b'{"model": "a", "model": "b"}', 400, None),               # duplicate key
    ("/v1/chat/completions", b'[' * 20000 + b']' * 20000, 400, None),                # nested too deep
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, 400, "model"),
    ("/v1/chat/completions", {"model": "tiny"}, 400, "messages"),
    ("/v1/chat/completions", chat_body(messages=[]), 400, "messages"),
    ("/v1/chat/completions", chat_body(messages="hi"), 400, "messages"),
    ("/v1/chat/completions", chat_body(messages=[{"role": "robot", "content": "hi"}]), 400, "messages[0].role"),
    ("/v1/chat/completions", chat_body(messages=[{"role": "user", "content": 5}]), 400, "messages[0].content"),
    ("/v1/chat/completions", chat_body(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), 400,
     "messages[0].content[0]"),
    ("/v1/chat/completions", chat_body(temperature="hot"), 400, "temperature"),
    ("/v1/chat/completions", chat_body(temperature=-1), 400, "temperature"),
    ("/v1/chat/completions", chat_body(top_p=2), 400, "top_p"),
    ("/v1/chat/completions", chat_body(top_p=0), 400, "top_p"),
    ("/v1/chat/completions", chat_body(top_k=-5), 400, "top_k"),
    ("/v1/chat/completions", chat_body(min_p=2), 400, "min_p"),
    ("/v1/chat/completions", chat_body(repeat_penalty=0), 400, "repetition_penalty"),
    ("/v1/chat/completions", chat_body(max_tokens=0), 400, "max_tokens"),
    ("/v1/chat/completions", chat_body(max_tokens=True), 400, "max_tokens"),
    ("/v1/chat/completions", chat_body(max_tokens=1.5), 400, "max_tokens"),
    ("/v1/chat/completions", chat_body(seed=-1), 400, "seed"),
    ("/v1/chat/completions", chat_body(stream="yes"), 400, "stream"),
    ("/v1/chat/completions", chat_body(stream_options={"include_usage": True}), 400, "stream_options"),
    ("/v1/chat/completions", chat_body(stop=[1]), 400, "stop"),
    ("/v1/chat/completions", chat_body(stop=["x"] * 17), 400, "stop"),
    ("/v1/chat/completions", chat_body(n=2), 400, "n"),
    ("/v1/chat/completions", chat_body(tools=[{"type": "function"}]), 400, "tools"),
    ("/v1/chat/completions", chat_body(temprature=0.5), 400, "temprature"),            # misspelt: refused
    ("/v1/completions", {"model": "tiny", "max_tokens": 2}, 400, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": [1, 99999]}, 400, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": ["a", "b"]}, 400, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": {"text": "a"}}, 400, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": "word " * 400}, 400, "prompt"),   # beyond the context
])
def test_bad_requests_get_openai_errors(server, path, body, status, param):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    code, _, out = raw(server.port, "POST", path, data)
    err = json.loads(out)["error"]
    assert code == status, err
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == "invalid_request_error" and err["param"] == param


def test_prompt_beyond_the_context_is_named_as_such(server):
    code, _, out = raw(server.port, "POST", "/v1/completions",
                       json.dumps({"model": "tiny", "prompt": "word " * 400}).encode())
    assert code == 400 and json.loads(out)["error"]["code"] == "context_length_exceeded"


def test_openai_client_raises_on_bad_request(client):
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=5)


def test_unknown_route_and_wrong_method(server):
    code, _, out = raw(server.port, "GET", "/v1/nothing")
    assert code == 404 and json.loads(out)["error"]["type"] == "not_found_error"
    code, headers, out = raw(server.port, "GET", "/v1/chat/completions")
    assert code == 405 and "error" in json.loads(out) and "POST" in headers.get("allow", "")


def _read_response(sock):
    r = http.client.HTTPResponse(sock)
    r.begin()
    return r.status, json.loads(r.read())


def test_huge_bodies_are_refused(server):
    # A declared length over the limit is refused before the body is sent at all.
    with socket.create_connection(("127.0.0.1", server.port), timeout=WAIT) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % (BODY_LIMIT * 1000))
        status, body = _read_response(s)
    assert status == 413 and body["error"]["code"] == "request_too_large"
    # A chunked body is cut off as soon as it passes the limit (the rest is never sent).
    with socket.create_connection(("127.0.0.1", server.port), timeout=WAIT) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n")
        piece = b"x" * 1024
        for _ in range(BODY_LIMIT // len(piece) + 1):
            s.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        status, body = _read_response(s)
    assert status == 413
    assert health(server.port)[0] == 200


def test_only_json_from_loopback_names(server):
    body = json.dumps(chat_body()).encode()
    code, _, out = raw(server.port, "POST", "/v1/chat/completions", body, {"Content-Type": "text/plain"})
    assert code == 415 and json.loads(out)["error"]["code"] == "unsupported_media_type"
    for host, status in (("evil.example:8080", 403), ("localhost:1234", 200), ("[::1]:80", 200)):
        code, _, out = raw(server.port, "POST", "/v1/chat/completions", body, {"Host": host})
        assert code == status, out
    assert raw(server.port, "GET", "/health", headers={"Host": "rebound.example"})[0] == 403


def test_api_key(folder):
    with serving(lambda: load(folder), api_key="s3cret") as (srv, _):
        body = json.dumps(chat_body()).encode()
        assert raw(srv.port, "POST", "/v1/chat/completions", body)[0] == 401
        assert raw(srv.port, "POST", "/v1/chat/completions", body, {"Authorization": "Bearer nope"})[0] == 401
        assert raw(srv.port, "GET", "/v1/models")[0] == 401
        assert health(srv.port)[0] == 200                    # health checks need no key
        ok = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="s3cret", max_retries=0, timeout=WAIT)
        assert ok.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2).choices
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{srv.url}/v1", api_key="wrong", max_retries=0).models.list()


# --- loading, the queue, cancellation --------------------------------------------------------------------
def test_health_is_503_while_loading(folder):
    go = threading.Event()

    def slow_loader():
        assert go.wait(WAIT)
        return load(folder)
    with serving(slow_loader, ready=False) as (srv, _):
        assert health(srv.port) == (503, {"status": "loading", "running": 0, "queued": 0, "queue_size": 4})
        code, headers, out = raw(srv.port, "POST", "/v1/chat/completions", json.dumps(chat_body()).encode())
        assert code == 503 and json.loads(out)["error"]["code"] == "model_loading" and "retry-after" in headers
        go.set()
        wait_for(lambda: health(srv.port)[0] == 200, "the model to load")
        assert raw(srv.port, "POST", "/v1/chat/completions", json.dumps(chat_body()).encode())[0] == 200


def test_a_failed_load_stops_the_server_with_its_error(folder):
    def broken():
        raise ValueError("manifest.json: n_heads must be > 0")
    server = HttpServer(Engine(broken), ServerSettings(port=0))
    with pytest.raises(ValueError, match="n_heads"):
        server.run()


def _post_in_thread(port, body, results, key):
    def go():
        results[key] = raw(port, "POST", "/v1/completions", json.dumps(body).encode())
    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t


def test_clients_beyond_the_queue_get_503_with_retry_after(folder):
    gated = []

    def loader():
        model, tok = load(folder)
        gated.append(Gated(model))
        return gated[0], tok
    with serving(loader, queue=1) as (srv, _):
        body = {"model": "tiny", "prompt": "Hello", "max_tokens": 3, "temperature": 0}
        results = {}
        a = _post_in_thread(srv.port, body, results, "a")                        # runs (blocked in forward)
        wait_for(lambda: health(srv.port)[1]["running"] == 1, "the first request to run")
        b = _post_in_thread(srv.port, body, results, "b")                        # waits in the queue
        wait_for(lambda: health(srv.port)[1]["queued"] == 1, "the second request to queue")
        code, headers, out = raw(srv.port, "POST", "/v1/completions", json.dumps(body).encode())
        assert code == 503 and int(headers["retry-after"]) >= 1
        assert json.loads(out)["error"]["code"] == "server_busy"
        with pytest.raises(openai.APIStatusError) as e:                          # the client sees it too
            openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0).completions.create(**body)
        assert e.value.status_code == 503
        gated[0].release(100)
        a.join(WAIT), b.join(WAIT)
        assert results["a"][0] == results["b"][0] == 200
        assert json.loads(results["a"][2])["choices"][0]["text"] == json.loads(results["b"][2])["choices"][0]["text"]
        assert health(srv.port)[1] == {"running": 0, "queued": 0, "queue_size": 1, "status": "ok"}


def _open_stream(port, body):
    s = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    data = json.dumps(body).encode()
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
    return s


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_drops_cancels_its_generation(folder, stream):
    gated = []

    def loader():
        model, tok = load(folder)
        gated.append(Gated(model))
        return gated[0], tok
    with serving(loader, queue=0) as (srv, _):
        model = gated[0]
        s = _open_stream(srv.port, chat_body(max_tokens=100, temperature=0, stream=stream))
        wait_for(lambda: health(srv.port)[1]["running"] == 1, "the generation to start")
        model.release(3)                                   # prefill + 2 decode steps
        if stream:
            got = b""
            while b"data: " not in got:                    # the stream has begun (the role chunk)
                got += s.recv(65536)
        wait_for(lambda: model.calls == 3, "three forward passes")
        s.close()
        # Release forward passes one at a time until the generation stops: uncancelled it would need 100
        # (max_tokens), cancelled it stops one pass after the server notices (milliseconds, or a few
        # passes on a loaded machine).
        for _ in range(60):
            if health(srv.port)[1]["running"] == 0:
                break
            model.release()
            time.sleep(0.1)
        assert health(srv.port)[1]["running"] == 0, "the generation went on after its client left"
        assert model.calls < 60
        model.release(100)
        assert raw(srv.port, "POST", "/v1/chat/completions", json.dumps(chat_body()).encode())[0] == 200


def test_a_queued_client_that_drops_leaves_the_queue(folder):
    gated = []

    def loader():
        model, tok = load(folder)
        gated.append(Gated(model))
        return gated[0], tok
    with serving(loader, queue=2) as (srv, _):
        first = _open_stream(srv.port, chat_body(max_tokens=2, stream=True))
        wait_for(lambda: health(srv.port)[1]["running"] == 1, "the first generation to start")
        waiting = _open_stream(srv.port, chat_body(max_tokens=2, stream=True))
        wait_for(lambda: health(srv.port)[1]["queued"] == 1, "the second request to queue")
        waiting.close()
        wait_for(lambda: health(srv.port)[1]["queued"] == 0, "the dropped request to leave the queue")
        gated[0].release(100)
        first.close()


def test_cancel_stops_a_long_prefill_between_chunks(folder, monkeypatch):
    import flashlm.runtime.generate as generate
    monkeypatch.setattr(generate, "PREFILL_CHUNK", 8)
    model, tok = load(folder)
    cancel = threading.Event()
    forward = model.forward

    def forward_then_cancel(tokens, **kw):                 # the client leaves during the first chunk
        cancel.set()
        return forward(tokens, **kw)
    model.forward = forward_then_cancel
    ids = tok.encode("The quick brown fox jumps over the lazy dog. " * 2)
    assert len(ids) > 16
    stats = GenerationStats()
    pieces = list(stream_generate(model, tok, ids, SamplingParams(), max_tokens=5, stats=stats, cancel=cancel))
    assert pieces == [] and stats.finish_reason == "cancelled"
    assert model.history == ids[:8] and stats.prompt_tokens == 8     # what ran stays reusable


# --- the command line -------------------------------------------------------------------------------------
def test_cli_serves_until_interrupted(folder):
    import signal
    proc = subprocess.Popen([sys.executable, "-m", "flashlm", "serve", str(folder), "--port", "0", "--queue", "2"],
                            stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        for _ in range(20):
            line = proc.stderr.readline()
            if "listening on" in line or not line:
                break
        assert "listening on http://127.0.0.1:" in line, line
        url = line.split("listening on ")[1].split()[0]
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        wait_for(lambda: health(port)[0] == 200, "the model to load")
        client = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=WAIT)
        assert client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=3).choices[0].message
        proc.send_signal(signal.SIGINT)
        err = proc.communicate(timeout=WAIT)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode in (0, 130) and "Traceback" not in err, err


@pytest.mark.parametrize("args, message", [
    (["/nonexistent.flashlm"], "nonexistent.flashlm"),
    (["MODEL", "--mode", "hybrid", "--memory-limit", "1KiB"], "does not fit the runtime itself"),  # whole process
    (["MODEL", "--mode", "hybrid", "--budget", "1KiB"], "too small"),
])
def test_cli_refuses_bad_setups_in_one_line(folder, args, message):
    args = [str(folder) if a == "MODEL" else a for a in args]
    r = subprocess.run([sys.executable, "-m", "flashlm", "serve", *args, "--port", "0"],
                       capture_output=True, text=True, timeout=WAIT)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("flashlm serve: error:") and message in last, r.stderr
