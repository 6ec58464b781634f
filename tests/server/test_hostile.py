"""Issue #15: what a hostile client or a hostile prefix folder tried, through the real server on 127.0.0.1.

The rule: no input, header, body or prefix folder yields a plain 500 or a traceback; one request's
failure never touches another's; every error has OpenAI's shape and is counted in /metrics.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import threading
import time

import pytest
import torch
from tiny_models import save_tiny_model_dir

from prefixtune import PrefixConfig, attach
from prefixtune.io.hub import load_causal_lm
from prefixtune.serving.engine import Engine, EngineConfig

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
from prefixtune.server.app import ServerConfig, ServerThread, create_app  # noqa: E402

TOKEN_ENV = "PREFIXTUNE_TEST_HOSTILE_TOKEN"
TOKEN = "hostile-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PROMPT = "name : Aromi | food : tea\n"
TIMEOUT = httpx.Timeout(30.0)
JSON = {"content-type": "application/json"}


class SlowTokenizer:
    """The real tokenizer, but a prompt starting with SLOW takes ``delay_s`` to tokenize (a 1 MiB prompt's
    stand-in that does not depend on the machine's speed)."""

    def __init__(self, tokenizer, delay_s: float) -> None:
        self.inner, self.delay_s = tokenizer, delay_s
        self.chat_template = None

    def __call__(self, text, **kwargs):
        if text.startswith("SLOW"):
            time.sleep(self.delay_s)
        return self.inner(text, **kwargs)

    def decode(self, ids, **kwargs):
        return self.inner.decode(ids, **kwargs)


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _hostile_folders(good, root) -> dict[str, str]:
    """Copies of the good prefix folder, each broken one way; returns name -> what is wrong."""
    cases: dict[str, str] = {}

    def copy(name: str, why: str):
        shutil.copytree(good, root / name)
        cases[name] = why
        return root / name

    def edit_config(name: str, why: str, change) -> None:
        folder = copy(name, why)
        meta = json.loads((folder / "prefix_config.json").read_text())
        meta = change(meta)
        (folder / "prefix_config.json").write_text(json.dumps(meta))

    def edit_weights(name: str, why: str, data: bytes, update_sha: bool = True) -> None:
        folder = copy(name, why)
        (folder / "prefix.safetensors").write_bytes(data)
        if update_sha:  # the checksum matches: the file itself must be checked
            meta = json.loads((folder / "prefix_config.json").read_text())
            meta["weights_sha256"] = _sha(folder / "prefix.safetensors")
            (folder / "prefix_config.json").write_text(json.dumps(meta))

    weights = (good / "prefix.safetensors").read_bytes()
    edit_weights("corrupt", "header", os.urandom(len(weights)))
    edit_weights("corrupt-sha", "corrupt", os.urandom(len(weights)), update_sha=False)
    edit_weights("truncated", "truncated", weights[: len(weights) // 2])
    edit_weights("empty", "too short", b"")
    edit_weights("huge-header", "header", struct.pack("<Q", 1 << 62) + weights[8:])
    header_len = struct.unpack("<Q", weights[:8])[0]
    edit_weights("bad-offsets", "bytes", weights[: 8 + header_len] + weights[8 + header_len: -4])

    def prefix_field(key, value):
        def change(meta):
            meta["prefix_config"][key] = value
            return meta
        return change

    edit_config("length-huge", "prefix_length", prefix_field("prefix_length", 10**12))
    edit_config("length-true", "prefix_length", prefix_field("prefix_length", True))
    edit_config("length-mismatch", "shape", prefix_field("prefix_length", 4))
    edit_config("init-5", "init", prefix_field("init", 5))
    edit_config("reparam-str", "reparam", prefix_field("reparam", "yes"))
    edit_config("config-list", "JSON object", lambda meta: [])
    edit_config("config-null", "JSON object", lambda meta: None)
    edit_config("base-model-str", "base_model", lambda meta: {**meta, "base_model": "llama"})
    edit_config("train-modules-5", "train_modules", lambda meta: {**meta, "train_modules": 5})
    edit_config("prefix-config-str", "prefix_config", lambda meta: {**meta, "prefix_config": "x"})
    edit_config("no-format", "format", lambda meta: {k: v for k, v in meta.items() if k != "format"})
    folder = copy("not-json", "JSON")
    (folder / "prefix_config.json").write_bytes(b"{\xff")
    return cases


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("hostile")
    model, tokenizer = load_causal_lm(save_tiny_model_dir(root / "model"))
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(0))
    prefixes = root / "prefixes"
    pm = attach(model, PrefixConfig(prefix_length=3, reparam=False))
    with torch.no_grad():
        pm.prefix.stacks["decoder"].table.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(1))
    pm.save_pretrained(prefixes / "good")
    ids = tokenizer(PROMPT)["input_ids"]
    expected = tokenizer.decode(pm.generate(input_ids=torch.tensor([ids]), max_new_tokens=8,
                                            do_sample=False)[0, len(ids):], skip_special_tokens=True)
    pm.detach()
    model.requires_grad_(False)
    cases = _hostile_folders(prefixes / "good", prefixes)
    engine = Engine(model, EngineConfig(max_batch_size=8))
    slow = SlowTokenizer(tokenizer, delay_s=1.5)
    os.environ[TOKEN_ENV] = TOKEN
    try:  # a bad folder is logged and skipped: the server starts
        app = create_app(engine, slow, ServerConfig(prefix_dir=prefixes, admin_token_env=TOKEN_ENV,
                                                    max_body_bytes=2 << 20))
    finally:
        del os.environ[TOKEN_ENV]
    with ServerThread(app) as server:
        yield {"url": server.url, "engine": engine, "cases": cases, "expected": expected, "model": model,
               "tokenizer": tokenizer}
    torch.set_num_threads(torch_threads)


@pytest.fixture
def http(hostile):
    with httpx.Client(base_url=hostile["url"], timeout=TIMEOUT) as client:
        yield client


def _error(response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if param is not None:
        assert error["param"] == param, error
    return error


def _count(http, pattern: str) -> int:
    line = next((x for x in http.get("/metrics").text.splitlines() if pattern in x), None)
    return 0 if line is None else int(line.split()[-1])


def test_extreme_temperature_and_top_p_do_not_break_the_batch(hostile, http):
    bodies = [{"model": "good", "prompt": PROMPT, "max_tokens": 8, "temperature": 0},
              {"model": "good", "prompt": PROMPT, "max_tokens": 8, "temperature": 1e-40},
              {"model": "good", "prompt": PROMPT, "max_tokens": 8, "temperature": 1.0, "top_p": 1e-50},
              {"model": "good", "prompt": PROMPT, "max_tokens": 8, "temperature": 2.0, "top_p": 5e-324}]
    results: list = [None] * len(bodies)

    def client(i: int) -> None:
        with httpx.Client(base_url=hostile["url"], timeout=TIMEOUT) as c:
            results[i] = c.post("/v1/completions", json=bodies[i])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert [r.status_code for r in results] == [200] * 4, [r.text for r in results]
    texts = [r.json()["choices"][0]["text"] for r in results]
    # the greedy neighbour is untouched; 1e-40 is argmax; top_p below every probability keeps the top token
    assert texts == [hostile["expected"]] * 4


def test_bad_prefix_folders_are_skipped_at_start_and_refused_with_400(hostile, http):
    assert [m["id"] for m in http.get("/v1/models").json()["data"]] == ["base", "good"]
    assert len(hostile["cases"]) == 18
    for name, why in hostile["cases"].items():
        error = _error(http.put(f"/v1/admin/prefixes/{name}", headers=AUTH), 400, "name")
        assert name in error["message"] and why in error["message"], (name, error["message"])
    assert [m["id"] for m in http.get("/v1/models").json()["data"]] == ["base", "good"]
    assert http.put("/v1/admin/prefixes/good", headers=AUTH).json()["prefix_length"] == 3


def test_lone_surrogates_are_400_and_the_connection_stays_usable(hostile, http):
    bodies = [b'{"model": "good", "prompt": "a\\ud800b"}',
              b'{"model": "good", "prompt": ["\\udfff"]}',
              b'{"model": "good", "prompt": "hi", "stop": ["\\ud800"]}',
              b'{"model": "good\\ud800", "prompt": "hi"}']
    for body, param in zip(bodies, ["prompt", "prompt", "stop", "model"], strict=True):
        error = _error(http.post("/v1/completions", content=body, headers=JSON), 400, param)
        assert "surrogate" in error["message"] or param == "model"
        ok = http.post("/v1/completions", json={"model": "good", "prompt": PROMPT, "max_tokens": 8, "temperature": 0})
        assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == hostile["expected"]
    chat = b'{"model": "good", "messages": [{"role": "user", "content": "\\ud800"}]}'
    assert "surrogate" in _error(http.post("/v1/chat/completions", content=chat, headers=JSON), 400,
                                 "messages")["message"]
    parts = b'{"model": "good", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}'
    _error(http.post("/v1/chat/completions", content=parts, headers=JSON), 400, "messages")


def test_seeded_request_gives_the_same_tokens_alone_and_in_a_busy_batch(hostile, http):
    def seeded(c, seed: int) -> str:
        body = {"model": "good", "prompt": PROMPT, "max_tokens": 24, "temperature": 2.0, "seed": seed,
                "ignore_eos": True}
        response = c.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["text"]

    alone = {seed: seeded(http, seed) for seed in range(4)}
    stop = threading.Event()

    def busy(i: int) -> None:  # greedy and unseeded neighbours of other lengths, joining all the time
        with httpx.Client(base_url=hostile["url"], timeout=TIMEOUT) as c:
            while not stop.is_set():
                c.post("/v1/completions", json={"model": ["good", "base"][i % 2], "prompt": "x" * (3 + 7 * i),
                                                "max_tokens": 5 + i, "temperature": [0, 1.0][i % 2]})

    threads = [threading.Thread(target=busy, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        loaded = {seed: seeded(http, seed) for seed in range(4)}
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert loaded == alone
    assert len(set(alone.values())) > 1


def test_metrics_count_the_500s_of_escaped_exceptions(hostile, http, monkeypatch):
    engine = hostile["engine"]
    before = _count(http, 'path="/health",status="500"')

    def broken():
        raise RuntimeError("boom")

    monkeypatch.setattr(engine, "stats", broken)
    error = _error(http.get("/health"), 500)
    assert error["type"] == "server_error" and "boom" not in error["message"]  # no internals sent
    monkeypatch.undo()
    assert _count(http, 'path="/health",status="500"') == before + 1


def test_tokenizing_a_long_prompt_does_not_block_the_event_loop(hostile, http):
    result: list = []
    slow = threading.Thread(target=lambda: result.append(
        httpx.post(hostile["url"] + "/v1/completions", json={"model": "good", "prompt": "SLOW" + "x" * (1 << 20)},
                   timeout=TIMEOUT)))
    slow.start()
    time.sleep(0.3)  # the 1 MiB request is being tokenized (1.5 s) now
    started = time.monotonic()
    assert http.get("/health").status_code == 200
    waited = time.monotonic() - started
    slow.join(timeout=30)
    assert waited < 0.7, f"/health waited {waited:.2f} s behind a tokenizer"
    _error(result[0], 400, "prompt")  # 1 MiB of characters: longer than the model's context


def test_finishing_on_a_stop_string_is_counted_as_stop(hostile, http):
    full = hostile["expected"]
    before = (_count(http, 'outcome="stop"'), _count(http, 'outcome="cancelled"'))
    body = {"model": "good", "prompt": PROMPT, "max_tokens": 400, "temperature": 0, "ignore_eos": True,
            "stop": [full[2]]}
    out = http.post("/v1/completions", json=body).json()
    assert out["choices"][0]["finish_reason"] == "stop" and out["choices"][0]["text"] == full[: full.index(full[2])]
    deadline = time.monotonic() + 10
    while _count(http, 'outcome="stop"') == before[0] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (_count(http, 'outcome="stop"'), _count(http, 'outcome="cancelled"')) == (before[0] + 1, before[1])


def test_unknown_routes_methods_and_unparsable_bodies_answer_in_openai_shape(hostile, http):
    assert _error(http.get("/v2/nothing"), 404)["code"] == "not_found"
    assert _error(http.delete("/health"), 405)["code"] == "method_not_allowed"
    _error(http.get("/v1/completions"), 405)
    _error(http.post("/v1/completions", content=b'{"model": "\xff"}', headers=JSON), 400)
    _error(http.post("/v1/completions", content=b"[]", headers=JSON), 400)
    _error(http.post("/v1/completions", content=b"model=good", headers={"content-type": "text/plain"}), 400)
    head = http.head("/health")
    assert head.status_code == 200 and head.content == b""
    assert _count(http, 'path="other",status="404"') >= 1


class ByteTokenizer:
    """One token per UTF-8 byte (ids 3..258), like a byte-level BPE without merges: decoding half of a
    multi-byte character gives U+FFFD until its other bytes arrive."""

    chat_template = None

    def __call__(self, text, **kwargs):
        return {"input_ids": [b + 3 for b in text.encode("utf-8")]}

    def decode(self, ids, **kwargs):
        return bytes(i - 3 for i in ids if i >= 3).decode("utf-8", errors="replace")


def test_stop_replacement_char_does_not_match_half_a_character(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=259, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                         eos_token_id=2)).eval()
    following = {0xC3 + 3: 0xA9 + 3, 0xA9 + 3: ord("x") + 3, ord("x") + 3: ord("y") + 3}  # é = C3 A9, then x y

    def force(module, args, kwargs, output):  # the next token follows from the last one: "éxyxy..."
        last = kwargs["input_ids"][:, -1].tolist()
        output.logits.fill_(-1e4)
        for row, token in enumerate(last):
            output.logits[row, -1, following.get(token, 0xC3 + 3)] = 1e4
        return output

    model.register_forward_hook(force, with_kwargs=True)
    engine = Engine(model, eos_token_ids=[])
    with ServerThread(create_app(engine, ByteTokenizer())) as server, httpx.Client(base_url=server.url,
                                                                                   timeout=TIMEOUT) as c:
        body = {"model": "base", "prompt": "a", "max_tokens": 4, "temperature": 0}
        assert c.post("/v1/completions", json=body).json()["choices"][0]["text"] == "éxy"
        out = c.post("/v1/completions", json={**body, "stop": ["\ufffd"]}).json()["choices"][0]
        assert (out["text"], out["finish_reason"]) == ("éxy", "length")
        lines = [json.loads(x[6:]) for x in c.post("/v1/completions", json={**body, "stop": "\ufffd", "stream": True})
                 .text.splitlines() if x.startswith("data: {")]
        assert "".join(x["choices"][0]["text"] for x in lines) == "éxy"
        out = c.post("/v1/completions", json={**body, "stop": ["é"]}).json()["choices"][0]
        assert (out["text"], out["finish_reason"]) == ("", "stop")
