"""The OpenAI-compatible server, run for real with uvicorn on 127.0.0.1 and a free port, spoken to
with the official ``openai`` client and with ``httpx`` (tiny random Llama, character tokenizer)."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
import torch
from tiny_models import save_tiny_model_dir

from prefixtune import PrefixConfig, attach
from prefixtune.io.hub import load_causal_lm
from prefixtune.serving.engine import Engine, EngineConfig

httpx = pytest.importorskip("httpx")  # the dev extra installs these; the `serve` extra fastapi and uvicorn
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
from prefixtune.server.app import ServerConfig, ServerThread, create_app  # noqa: E402

TOKEN_ENV = "PREFIXTUNE_TEST_ADMIN_TOKEN"
TOKEN = "s3cret-token"
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")
PROMPT = "name : Aromi | food : tea\n"
TIMEOUT = httpx.Timeout(30.0)


class Gate:
    """A forward pre-hook that can slow every model call down (to test queues and disconnects)."""

    def __init__(self) -> None:
        self.delay_s = 0.0
        self.open = threading.Event()
        self.open.set()

    def __call__(self, module, args, kwargs):
        self.open.wait(timeout=20)
        if self.delay_s:
            time.sleep(self.delay_s)


def _save_prefix(model, folder, length: int, seed: int):
    pm = attach(model, PrefixConfig(prefix_length=length, reparam=False))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        pm.prefix.stacks["decoder"].table.copy_(torch.randn(pm.prefix.stacks["decoder"].table.shape, generator=g))
    pm.save_pretrained(folder)
    return pm


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: threads only add synchronisation on a busy machine
    root = tmp_path_factory.mktemp("serve")
    model, tokenizer = load_causal_lm(save_tiny_model_dir(root / "model"))
    tokenizer.chat_template = CHAT_TEMPLATE
    with torch.no_grad():  # large weights: outputs that change from token to token
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(0))
    model.save_pretrained(root / "model")  # the folder `prefixtune serve` loads in the CLI test
    prefixes = root / "prefixes"
    expected: dict[str, list[int]] = {}
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    chat_text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                              add_generation_prompt=True)
    chat_ids = tokenizer(chat_text, add_special_tokens=False)["input_ids"]
    for name, length, seed in [("alpha", 3, 1), ("beta.v2", 5, 2), ("gamma", 2, 3)]:
        pm = _save_prefix(model, prefixes / name, length, seed)
        for key, ids in (("", prompt_ids), ("chat:", chat_ids)):
            out = pm.generate(input_ids=torch.tensor([ids]), max_new_tokens=8, do_sample=False)
            expected[key + name] = out[0, len(ids):].tolist()
        pm.detach()
    (prefixes / "gamma").rename(root / "gamma")  # added at run time through the admin endpoint
    (prefixes / "bad name").mkdir()
    (prefixes / "bad name" / "prefix_config.json").write_text("{}")
    (prefixes / "outside").symlink_to(root / "gamma")
    model.requires_grad_(False)
    out = model.generate(input_ids=torch.tensor([prompt_ids]), max_new_tokens=8, do_sample=False)
    expected["base"] = out[0, len(prompt_ids):].tolist()
    gate = Gate()
    model.register_forward_pre_hook(gate, with_kwargs=True)
    engine = Engine(model, EngineConfig(max_batch_size=2, max_waiting=2))
    os.environ[TOKEN_ENV] = TOKEN
    try:
        app = create_app(engine, tokenizer, ServerConfig(prefix_dir=prefixes, admin_token_env=TOKEN_ENV,
                                                         max_body_bytes=4096, max_tokens=500))
    finally:
        del os.environ[TOKEN_ENV]
    with ServerThread(app) as server:
        yield {"url": server.url, "expected": expected, "tokenizer": tokenizer, "gate": gate, "root": root,
               "prefixes": prefixes, "engine": engine}
    torch.set_num_threads(torch_threads)


@pytest.fixture
def oai(setup):
    with openai.OpenAI(base_url=setup["url"] + "/v1", api_key="unused", max_retries=0, timeout=30) as client:
        yield client


@pytest.fixture
def http(setup):
    with httpx.Client(base_url=setup["url"], timeout=TIMEOUT) as client:
        yield client


def _text(setup, key: str) -> str:
    return setup["tokenizer"].decode(setup["expected"][key], skip_special_tokens=True)


def test_models_list_health_and_metrics(setup, oai, http):
    assert [m.id for m in oai.models.list()] == ["base", "alpha", "beta.v2"]  # bad names and symlinks skipped
    assert http.get("/health").json()["status"] == "ok"
    metrics = http.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    for name in ("prefixtune_requests_total", "prefixtune_generated_tokens_total", "prefixtune_queue_depth",
                 "prefixtune_batch_size", 'prefixtune_http_responses_total{path="/health",status="200"}'):
        assert name in metrics.text


@pytest.mark.parametrize("model", ["alpha", "beta.v2", "base"])
def test_completion_equals_prefix_model_generate(setup, oai, model):
    out = oai.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0)
    assert out.choices[0].text == _text(setup, model)
    assert out.model == model and out.usage.completion_tokens == len(setup["expected"][model])
    assert out.choices[0].finish_reason == ("length" if len(setup["expected"][model]) == 8 else "stop")


def test_chat_uses_the_chat_template(setup, oai):
    out = oai.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                                      temperature=0)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == _text(setup, "chat:alpha")
    unbounded = oai.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hi"}],
                                            temperature=0)  # no max_tokens: as far as the context allows
    assert unbounded.choices[0].message.content.startswith(_text(setup, "chat:alpha"))
    assert unbounded.usage.total_tokens + 3 <= 512


def test_streaming_gives_the_same_text(setup, oai):
    stream = oai.completions.create(model="beta.v2", prompt=PROMPT, max_tokens=8, temperature=0, stream=True,
                                    stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == _text(setup, "beta.v2")
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("length", "stop")
    assert chunks[-1].usage.completion_tokens == len(setup["expected"]["beta.v2"])
    chat = oai.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                                       temperature=0, stream=True)
    deltas = [c.choices[0].delta for c in chat]
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == _text(setup, "chat:alpha")


def test_seeded_sampling_and_stop_strings(setup, oai):
    def sample(seed):
        return oai.completions.create(model="alpha", prompt=PROMPT, max_tokens=12, temperature=1.0, seed=seed,
                                      top_p=0.9).choices[0].text

    assert sample(5) == sample(5)
    assert sample(5) != sample(6) or sample(7) != sample(5)
    full = _text(setup, "alpha")
    stop = full[3]
    out = oai.completions.create(model="alpha", prompt=PROMPT, max_tokens=8, temperature=0, stop=[stop])
    assert out.choices[0].text == full[: full.index(stop)] and out.choices[0].finish_reason == "stop"
    chunks = list(oai.completions.create(model="alpha", prompt=PROMPT, max_tokens=8, temperature=0, stop=stop,
                                         stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full[: full.index(stop)]
    two = full[4:6]  # a stop string over two tokens: held back until it is complete, then cut
    chunks = list(oai.completions.create(model="alpha", prompt=PROMPT, max_tokens=8, temperature=0, stop=two,
                                         stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full[: full.index(two)]


def _error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    if param is not None:
        assert error["param"] == param, error
    return error


@pytest.mark.parametrize(("body", "param"), [
    ({"temperature": 2.5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 501}, "max_tokens"),
    ({"n": 2}, "n"),
    ({"seed": -1}, "seed"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": [5, 100000]}, "prompt"),
    ({"prompt": "x" * 600}, "prompt"),  # longer than the model's 512 positions
    ({"prompt": ""}, "prompt"),
    ({"echo": True}, "echo"),
    ({"model": None}, "model"),
])
def test_bad_parameters_are_400_naming_the_field(http, body, param):
    _error(http.post("/v1/completions", json={"model": "alpha", "prompt": "hi", **body}), 400, param)


def test_other_errors(setup, oai, http):
    with pytest.raises(openai.NotFoundError) as exc:
        oai.completions.create(model="nope", prompt="hi")
    assert exc.value.body["param"] == "model"
    _error(http.post("/v1/chat/completions", json={"model": "alpha"}), 400, "messages")
    _error(http.post("/v1/chat/completions", json={"model": "alpha", "messages": [{"role": "robot",
                                                                                   "content": "x"}]}), 400, "messages")
    _error(http.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"}), 400)
    big = {"model": "alpha", "prompt": "x" * 5000}
    assert "payload" in _error(http.post("/v1/completions", json=big), 413)["code"]
    chunked = http.post("/v1/completions", content=iter([json.dumps(big).encode()[:3000]] * 2),
                        headers={"content-type": "application/json"})
    _error(chunked, 413)


def test_full_queue_is_503_with_retry_after(setup):
    """2 rows run and 2 wait at most: of 6 concurrent requests, those beyond capacity are refused at once.

    How many depends on whether the engine admitted 2 to its running batch before the others arrived
    (the gate holds the model, not admission): 2 refused if it did, up to 4 if all 6 arrived first.
    """
    gate = setup["gate"]
    gate.open.clear()
    results: list[httpx.Response] = []

    def client() -> None:
        with httpx.Client(base_url=setup["url"], timeout=TIMEOUT) as c:
            results.append(c.post("/v1/completions", json={"model": "alpha", "prompt": "hi", "max_tokens": 2}))

    threads = [threading.Thread(target=client) for _ in range(6)]
    try:
        for t in threads:
            t.start()
        # the gate holds every admitted request, so at most 4 of the 6 can be held and at least 2 must be
        # refused; the gate opens only then, so that a slow-starting client cannot arrive after the others
        # have finished (and find room) on a loaded machine
        deadline = time.monotonic() + 20
        while sum(r.status_code == 503 for r in results) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        gate.open.set()
        for t in threads:
            t.join(timeout=30)
    refused = [r for r in results if r.status_code == 503]
    assert refused and refused[0].headers["retry-after"] == "1"
    assert refused[0].json()["error"]["code"] == "queue_full"
    assert all(r.status_code == 200 for r in results if r.status_code != 503)
    assert len(results) == 6 and 2 <= len(refused) <= 4


def _cancelled(http) -> int:
    line = next(x for x in http.get("/metrics").text.splitlines() if 'outcome="cancelled"' in x)
    return int(line.split()[-1])


def _wait_cancelled(http, before: int) -> None:
    deadline = time.monotonic() + 15
    while _cancelled(http) <= before:
        assert time.monotonic() < deadline, "the generation was not cancelled"
        time.sleep(0.05)


def test_client_disconnect_cancels_generation(setup, http):
    gate = setup["gate"]
    gate.delay_s = 0.02  # 500 tokens would take > 10 s
    try:
        before = _cancelled(http)
        # ignore_eos: a sampled EOS must not end the generation before the client goes away
        body = {"model": "alpha", "prompt": "hi", "max_tokens": 500, "stream": True, "ignore_eos": True}
        with httpx.Client(base_url=setup["url"], timeout=TIMEOUT) as c, c.stream("POST", "/v1/completions",
                                                                                json=body) as r:
            assert r.status_code == 200
            next(r.iter_lines())  # one event arrived; leaving the block closes the connection
        _wait_cancelled(http, before)
        before = _cancelled(http)
        with httpx.Client(base_url=setup["url"], timeout=httpx.Timeout(0.5)) as c, pytest.raises(
                httpx.ReadTimeout):
            c.post("/v1/completions", json={**body, "stream": False})
        _wait_cancelled(http, before)
    finally:
        gate.delay_s = 0.0
    tokens = setup["engine"].stats().counters["generated_tokens"]
    assert setup["engine"].stats().running == 0 and tokens < 1000


def test_admin_add_and_remove(setup, oai, http):
    gamma = setup["root"] / "gamma"
    gamma.rename(setup["prefixes"] / "gamma")
    try:
        url = "/v1/admin/prefixes/gamma"
        _error(http.put(url), 401)
        _error(http.put(url, headers={"Authorization": "Bearer wrong"}), 401)
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert http.put(url, headers=auth).json()["prefix_length"] == 2
        assert "gamma" in [m.id for m in oai.models.list()]
        out = oai.completions.create(model="gamma", prompt=PROMPT, max_tokens=8, temperature=0)
        assert out.choices[0].text == _text(setup, "gamma")
        _error(http.put("/v1/admin/prefixes/bad$name", headers=auth), 400, "name")
        _error(http.put("/v1/admin/prefixes/" + "a" * 65, headers=auth), 400, "name")
        _error(http.put("/v1/admin/prefixes/missing", headers=auth), 404, "name")
        _error(http.put("/v1/admin/prefixes/outside", headers=auth), 404, "name")  # symlink out of the folder
        _error(http.put("/v1/admin/prefixes/base", headers=auth), 409, "name")
        assert http.delete(url, headers=auth).json()["deleted"] is True
        _error(http.delete(url, headers=auth), 404, "name")
        _error(http.post("/v1/completions", json={"model": "gamma", "prompt": "hi"}), 404, "model")
    finally:
        (setup["prefixes"] / "gamma").rename(gamma)


def test_admin_is_off_without_a_token(setup):
    engine = Engine(setup["engine"].model)
    app = create_app(engine, setup["tokenizer"], ServerConfig(prefix_dir=setup["prefixes"], admin_token_env=TOKEN_ENV))
    with ServerThread(app) as server, httpx.Client(base_url=server.url, timeout=TIMEOUT) as c:
        _error(c.put("/v1/admin/prefixes/alpha", headers={"Authorization": f"Bearer {TOKEN}"}), 404)
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["base", "alpha", "beta.v2"]


def test_cli_serve_builds_the_app(setup, monkeypatch):
    import uvicorn

    from prefixtune.cli import main

    captured = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: captured.update(app=app, **kw))
    folder = setup["root"] / "model"
    assert main(["serve", "--model", str(folder), "--prefixes", str(setup["prefixes"]), "--port", "0"]) == 0
    assert (captured["host"], captured["port"]) == ("127.0.0.1", 0)
    with ServerThread(captured["app"]) as server, httpx.Client(base_url=server.url, timeout=TIMEOUT) as c:
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["model", "alpha", "beta.v2"]
