"""memdb-worker end to end with real processes: a memdb-server, a memory built from a real
prefix (TREC demonstrations) with SmolLM2, and two memdb-worker replicas (one caching the memory,
one looking it up remotely per layer) serving the OpenAI-compatible API.

Checks: both replicas give the tokens of in-process decoding with the memory; an update reaches
both (poll, ~1 s); a delete gives 404; concurrent requests are batched; with the server killed,
plain requests are still served and memory requests get 503, then recover after the server
restarts on the same data dir; the `openai` client works unchanged; a memory of the builder's
defaults (fitted rows) is served by the caching replica and refused by the remote one.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time

import httpx
import pytest

from memdb_client import MemdbClient
from memdb_server.process import start_server
from memdb_worker.build import BuildOptions, build_memory
from memdb_worker.demo import DATA  # ../shared/data, or MEMDB_DATA
from memdb_worker.model.loading import model_fingerprint
from memdb_worker.serve.process import launch_worker, wait_worker
from memdb_worker.serve.scheduler import SamplingParams, Scheduler
from tests.tiny import LOOKUP

pytestmark = pytest.mark.model

TEMPLATE = "Question: {text}\nType: {label}\n\n"
QUERY = "Question: {text}\nType:"
NAME = "trec-support"
PARAMS = {"max_tokens": 4, "temperature": 0, "stop": ["\n"]}


def _rows(dataset: str, split: str = "train") -> list[dict]:
    with open(DATA / dataset / f"{split}.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def _build(model, tok, dataset: str, seed: int, lookup: bool = True):
    rng = random.Random(seed)
    rows = rng.sample(_rows(dataset), 20)
    prefix = "".join(TEMPLATE.format(**r) for r in rows[:10])
    traces = [TEMPLATE.format(**r).rstrip("\n") for r in rows[10:]]
    # looked-up entries (LOOKUP), which the remote replica looks up per layer; else the
    # builder's defaults (fitted rows, attended as a whole: cache mode only)
    opts = BuildOptions(**LOOKUP, seed=seed) if lookup else BuildOptions(seed=seed)
    return build_memory(model, tok, prefix, traces, 16, opts, progress=False)


@pytest.fixture(scope="module")
def stack(smollm2, tmp_path_factory):
    """Server, tenant keys, two workers (started first: they load the model meanwhile), memories."""
    work = tmp_path_factory.mktemp("serving")
    server = start_server(work / "data")
    root = MemdbClient(server.address, server.admin_key)
    root.create_tenant("acme")
    writer_key, _ = root.create_api_key("writer", tenant="acme")
    reader_key, _ = root.create_api_key("reader", tenant="acme")
    launched = [
        launch_worker(server.address, reader_key, work, name="w-cache", threads=1),
        launch_worker(server.address, reader_key, work, name="w-remote", threads=1,
                      memory_mode="remote"),
    ]  # fmt: skip
    state: dict = {"server": server, "work": work}
    try:
        model, tok = smollm2
        fp = model_fingerprint(model)
        v1 = _build(model, tok, "trec", 0)
        v2 = _build(model, tok, "sst2", 1)
        prompt, ref = _references(model, tok, v1, v2)
        writer = MemdbClient(server.address, writer_key)
        state.update(writer=writer, fp=fp, v1=v1, v2=v2, refs=(prompt, ref))
        put(state, "v1")
        # the one-shot CLI, meanwhile (it loads its own model)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MEMDB_")}
        env.update(MEMDB_SERVER=server.address, MEMDB_API_KEY=reader_key)
        state["generate"] = subprocess.Popen(
            [sys.executable, "-m", "memdb_worker.serve.cli", "generate", "--memory", NAME,
             "--max-tokens", "4", "--threads", "1", "--log-level", "WARNING", prompt],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        state["workers"] = [wait_worker(*w) for w in launched]
        yield state
        writer.close()
    finally:
        for proc, _, _ in launched:
            if proc.poll() is None:
                proc.terminate()
        for proc, _, _ in launched:
            proc.wait(20)
        root.close()
        state["server"].stop()


def put(stack, which: str) -> int:
    b = stack[which]
    info = stack["writer"].put_prefix(NAME, b.shards, model_fingerprint=stack["fp"],
                                      token_count=b.token_count, mode="upsert")  # fmt: skip
    return info.version


def complete(url: str, prompt: str, memory: str | None = NAME, **kw) -> httpx.Response:
    body = {"prompt": prompt, **PARAMS, **kw}
    if memory:
        body["memory"] = memory
    return httpx.post(f"{url}/v1/completions", json=body, timeout=120)


def poll(fn, timeout: float, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        got = fn()
        if got or time.monotonic() > deadline:
            return got
        time.sleep(every)


def _references(model, tok, v1, v2) -> tuple[str, dict[str, str]]:
    """A TREC test question where the two memories answer differently, and the in-process
    answers with v1, v2 and plainly."""
    sched = Scheduler(model, tok).start()
    try:
        p = SamplingParams(4, stop=("\n",))
        mems = {"v1": v1.to_memory(), "v2": v2.to_memory()}
        for q in _rows("trec", "test")[:12]:
            ids = tok(QUERY.format(**q)).input_ids
            got = {k: sched.generate(ids, p, m)[0] for k, m in mems.items()}
            if got["v1"] != got["v2"]:
                got["plain"] = sched.generate(ids, p, None)[0]
                return QUERY.format(**q), got
    finally:
        sched.stop()
    pytest.fail("no question where the two memories answer differently")


@pytest.fixture(scope="module")
def refs(stack):
    return stack["refs"]


def test_replicas_answer_with_the_memory_like_in_process_decoding(stack, refs):
    prompt, ref = refs
    put(stack, "v1")
    texts = []
    for w in stack["workers"]:
        r = complete(w.url, prompt)
        assert r.status_code == 200, r.text
        texts.append(r.json()["choices"][0]["text"])
    assert texts == [ref["v1"], ref["v1"]]  # cache replica == remote replica == in-process
    plain = complete(stack["workers"][0].url, prompt, memory=None)
    assert plain.json()["choices"][0]["text"] == ref["plain"]


def test_one_shot_generate_cli(stack, refs):
    prompt, ref = refs
    out, err = stack["generate"].communicate(timeout=120)
    assert stack["generate"].returncode == 0, err[-2000:]
    assert out.startswith(ref["v1"]), out  # the CLI has no stop string: it may go on


def test_update_reaches_both_replicas_and_delete_gives_404(stack, refs):
    prompt, ref = refs
    put(stack, "v1")
    for w in stack["workers"]:
        assert complete(w.url, prompt).json()["choices"][0]["text"] == ref["v1"]
    v1 = httpx.get(f"{stack['workers'][0].url}/health").json()["cache"]["memories"][NAME]
    v2 = put(stack, "v2")
    t0 = time.monotonic()
    for w in stack["workers"]:  # the cached v1 is dropped within a second of the update
        dropped = poll(lambda w=w: _cached(w).get(NAME) != v1, 1.0 - (time.monotonic() - t0))
        assert dropped, f"{w.url} still caches version {v1} after {time.monotonic() - t0:.2f} s"
    for w in stack["workers"]:
        switched = poll(lambda w=w: complete(w.url, prompt).json()["choices"][0]["text"]
                        == ref["v2"], 5.0)  # fmt: skip
        assert switched, w.log()[-2000:]
    assert all(_cached(w) == {NAME: v2} for w in stack["workers"])
    stack["writer"].delete_prefix(NAME)
    for w in stack["workers"]:
        r = poll(lambda w=w: (r := complete(w.url, prompt)).status_code == 404 and r, 2.0)
        assert r, "delete did not reach the worker"
        err = r.json()["error"]
        assert err["code"] == "not_found" and NAME in err["message"]


def _cached(worker) -> dict[str, int]:
    return httpx.get(f"{worker.url}/health").json()["cache"]["memories"]


def test_model_mismatch_is_409(stack, refs):
    b = stack["v1"]
    stack["writer"].put_prefix("other-model", b.shards, model_fingerprint="sha256:other",
                               token_count=b.token_count, mode="upsert")  # fmt: skip
    r = complete(stack["workers"][0].url, refs[0], memory="other-model")
    assert r.status_code == 409 and "built for model" in r.json()["error"]["message"]


def test_a_fitted_memory_is_served_from_the_cache_and_refused_by_remote_lookups(stack, smollm2):
    """The builder's defaults (fitted rows): the caching replica answers like in-process
    decoding with the memory; the remote replica refuses it (409) and says to cache it."""
    model, tok = smollm2
    built = _build(model, tok, "trec", 2, lookup=False)
    assert built.metadata["entry_state"] == "fitted"
    stack["writer"].put_prefix("fitted", built.shards, model_fingerprint=stack["fp"],
                               token_count=built.token_count, mode="upsert")  # fmt: skip
    sched = Scheduler(model, tok).start()
    try:  # a question where the memory changes the answer, so the check below can fail
        p, mem = SamplingParams(4, stop=("\n",)), built.to_memory()
        for q in _rows("trec", "test")[:12]:
            ids = tok(QUERY.format(**q)).input_ids
            want = sched.generate(ids, p, mem)[0]
            if want != sched.generate(ids, p, None)[0]:
                break
        else:
            pytest.fail("no question where the fitted memory changes the answer")
    finally:
        sched.stop()
    cached, remote = stack["workers"]
    r = complete(cached.url, QUERY.format(**q), memory="fitted")
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == want
    r = complete(remote.url, QUERY.format(**q), memory="fitted")
    assert r.status_code == 409, r.text
    assert r.json()["error"]["code"] == "memory_not_remote"
    msg = r.json()["error"]["message"]
    assert "fitted entries" in msg and "--memory-mode cache" in msg


def test_concurrent_requests_are_batched_with_the_same_answers(stack, refs):
    prompt, ref = refs
    put(stack, "v1")
    url = stack["workers"][0].url
    out: dict[int, str] = {}

    def send(i: int) -> None:
        r = complete(url, prompt, memory=NAME if i % 2 == 0 else None)
        out[i] = r.json()["choices"][0]["text"]

    threads = [threading.Thread(target=send, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [out[i] for i in range(6)] == [ref["v1"], ref["plain"]] * 3
    metrics = httpx.get(f"{url}/metrics").text
    steps = _metric(metrics, "memdb_worker_decode_steps_total")
    assert 0 < steps < _metric(metrics, "memdb_worker_decode_rows_total")  # rows shared steps


def _metric(text: str, name: str, status: str | None = None) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (status is None or f'status="{status}"' in line):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_openai_client_works_unchanged(stack, refs):
    openai = pytest.importorskip("openai")
    prompt, ref = refs
    put(stack, "v1")
    w = stack["workers"][0]
    client = openai.OpenAI(base_url=f"{w.url}/v1", api_key="unused", timeout=120)
    model = client.models.list().data[0].id
    extra = {"memory": NAME}
    c = client.completions.create(model=model, prompt=prompt, max_tokens=4, temperature=0,
                                  stop=["\n"], extra_body=extra)  # fmt: skip
    assert c.choices[0].text == ref["v1"] and c.usage.completion_tokens >= 1
    chunks = client.completions.create(model=model, prompt=prompt, max_tokens=4, temperature=0,
                                       stop=["\n"], extra_body=extra, stream=True)  # fmt: skip
    assert "".join(ch.choices[0].text for ch in chunks) == ref["v1"]
    top1 = client.completions.create(model=model, prompt=prompt, max_tokens=4, temperature=1.5,
                                     stop=["\n"], extra_body={**extra, "top_k": 1})  # fmt: skip
    assert top1.choices[0].text == ref["v1"]  # top_k = 1 leaves the argmax alone to draw
    messages = [{"role": "user", "content": "Name a color."}]
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=6,
                                          temperature=0, extra_body=extra)  # fmt: skip
    text = chat.choices[0].message.content
    assert text and chat.choices[0].finish_reason in ("stop", "length")
    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=6, temperature=0, extra_body=extra, stream=True
    )
    assert "".join(ch.choices[0].delta.content or "" for ch in stream) == text
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model=model, prompt="x", max_tokens=2,
                                  extra_body={"memory": "no-such-memory"})  # fmt: skip


def test_server_down_plain_requests_served_memory_503_then_recovered(stack, refs):
    prompt, ref = refs
    put(stack, "v1")
    workers = stack["workers"]
    for w in workers:
        assert complete(w.url, prompt).status_code == 200
    server = stack["server"]
    port = server.address.rsplit(":", 1)[1]
    server.kill()
    try:
        for w in workers:
            r = poll(lambda w=w: (r := complete(w.url, prompt)).status_code == 503 and r, 5.0)
            assert r, w.log()[-2000:]
            assert r.json()["error"]["code"] == "memdb_unavailable"
            plain = complete(w.url, prompt, memory=None)
            assert plain.status_code == 200 and plain.json()["choices"][0]["text"] == ref["plain"]
            assert httpx.get(f"{w.url}/health").json()["memdb_server"]["connected"] is False
    finally:
        stack["server"] = start_server(stack["work"] / "data", listen=f"127.0.0.1:{port}")
    for w in workers:
        r = poll(lambda w=w: (r := complete(w.url, prompt)).status_code == 200 and r, 20.0, 0.2)
        assert r, w.log()[-2000:]
        assert r.json()["choices"][0]["text"] == ref["v1"]


def test_sigterm_shuts_a_worker_down_gracefully(stack):
    w = stack["workers"][1]  # the last test: the module's workers are not needed any more
    assert w.stop() == 0
    assert "memdb-worker stopped" in w.log()
