"""``lads serve``: every endpoint through FastAPI's test client, each kind of bad input, and
concurrent requests that each get their own boxes."""

from __future__ import annotations

import base64
import io
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from lads.errors import LadsError

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from lads.serve import create_app, load_service  # noqa: E402


@pytest.fixture(scope="module")
def service(trained):
    return load_service(trained[0], ["serve.max_expressions=4", "serve.max_megapixels=0.5",
                                     "serve.max_image_mb=1", "serve.max_expression_chars=80",
                                     "serve.requests_per_minute=0"])


@pytest.fixture(scope="module")
def client(service):
    return TestClient(create_app(service))


def png(size=(64, 48), colour=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def post(client, data: bytes, expressions, **fields):
    files = {"image": ("x.png", data, "image/png")}
    form = {"expression": expressions, **{k: str(v).lower() for k, v in fields.items()}}
    return client.post("/v1/predict", files=files, data=form)


def test_health_model_page_and_openapi(client):
    assert client.get("/v1/health").json() == {"status": "ok"}
    model = client.get("/v1/model").json()
    assert model["bottlenecks"] == 16 and model["dtype"] == "float32" and "CPU" in model["device"]
    assert model["config"]["head"] == "token" and sum(model["parameters"].values()) > 0
    page = client.get("/")
    assert page.status_code == 200 and 'id="expressions"' in page.text
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    assert set(body) == {"multipart/form-data", "application/json"}


def test_predict_multipart_and_json_give_the_same_boxes(client, service):
    from lads.inference import predict

    image = service.examples[0].read_bytes()
    expressions = ["the red circle", "the leftmost object"]
    upload = post(client, image, expressions, drawing=True)
    assert upload.status_code == 200, upload.text
    body = upload.json()
    as_json = client.post("/v1/predict", json={"image": base64.b64encode(image).decode(), "expressions": expressions})
    assert [p["box"] for p in as_json.json()["predictions"]] == [p["box"] for p in body["predictions"]]
    reference = predict(service.model, service.examples[0], expressions)  # what `lads predict` prints
    for got, want in zip(body["predictions"], reference):
        assert got["box"] == pytest.approx(want["box"], abs=0.05) and got["summary"] == want["summary"]
        assert 0 < got["flops"] <= 1 and isinstance(got["cache_hit"], bool)
    assert set(body["times_ms"]) == {"text", "extract", "forward", "total"}
    assert base64.b64decode(body["subnets_png"]).startswith(b"\x89PNG")
    dense = post(client, image, expressions, dense=True).json()
    assert dense["mode"] == "dense" and [p["flops"] for p in dense["predictions"]] == pytest.approx([1, 1])


def test_examples_are_served_by_number(client, service):
    listed = client.get("/v1/examples").json()["examples"]
    assert len(listed) == len(service.examples) > 0
    assert client.get(listed[0]["url"]).content == service.examples[0].read_bytes()
    assert client.get(f"/v1/examples/{len(listed)}").status_code == 404
    assert client.get("/v1/examples/..%2F..%2Fetc%2Fpasswd").status_code in (404, 422)


@pytest.mark.parametrize("case, status, words", [
    ("not an image", 415, "not an image"),
    ("truncated", 400, "truncated"),
    ("too many pixels", 413, "megapixels"),
    ("too many bytes", 413, "MB"),
    ("empty expression", 422, "empty"),
    ("long expression", 422, "characters"),
    ("too many expressions", 422, "at most 4"),
    ("no expression", 422, "expression"),
    ("bad base64", 400, "base64"),
    ("plain text body", 415, "multipart"),
])
def test_bad_input_gets_a_4xx_that_says_what_and_the_server_keeps_serving(client, case, status, words):
    good = png()
    if case == "not an image":
        answer = post(client, b"hello, this is text", ["the star"])
    elif case == "truncated":
        answer = post(client, good[: len(good) // 2], ["the star"])
    elif case == "too many pixels":
        answer = post(client, png((1000, 1000)), ["the star"])
    elif case == "too many bytes":
        answer = post(client, good + b"\0" * (3 << 20), ["the star"])
    elif case == "empty expression":
        answer = post(client, good, ["the star", "  "])
    elif case == "long expression":
        answer = post(client, good, ["the star " * 20])
    elif case == "too many expressions":
        answer = post(client, good, ["a", "b", "c", "d", "e"])
    elif case == "no expression":
        answer = client.post("/v1/predict", files={"image": ("x.png", good, "image/png")})
    elif case == "bad base64":
        answer = client.post("/v1/predict", json={"image": "***", "expressions": ["a"]})
    else:
        answer = client.post("/v1/predict", content=b"hello", headers={"content-type": "text/plain"})
    assert answer.status_code == status, answer.text
    assert words in answer.json()["error"]
    assert post(client, good, ["the star"]).status_code == 200  # still serving


def test_concurrent_requests_each_get_their_own_boxes(client, service):
    images = [p.read_bytes() for p in service.examples[:4]]
    jobs = [(images[i % len(images)], [f"the {c} {s}"]) for i, (c, s) in
            enumerate([(c, s) for c in ("red", "green", "blue") for s in ("circle", "square", "star", "cross")])]
    alone = [post(client, image, e).json()["predictions"][0]["box"] for image, e in jobs]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda job: post(client, *job), jobs))
    assert all(a.status_code == 200 for a in together)
    for answer, box in zip(together, alone):
        assert answer.json()["predictions"][0]["box"] == pytest.approx(box, abs=0.05)
    assert [a.json()["predictions"][0]["expression"] for a in together] == [e[0] for _, e in jobs]


def test_no_checkpoint_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LadsError, match="runs/demo/lads/checkpoint: no trained model there.*scripts/demo.sh"):
        load_service(None, [])
    with pytest.raises(LadsError, match="serve.. settings only"):
        load_service(tmp_path, ["train.epochs=3"])


def test_binding_beyond_this_machine_needs_a_key_or_insecure(trained):
    """Without a key, ``--host 0.0.0.0`` is refused in one line; ``--insecure`` binds with a
    warning; with ``LADS_API_KEY`` set it binds without one."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "LADS_API_KEY"}
    env.update(PYTHONPATH=str(Path(__file__).resolve().parents[1]), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "lads.cli", "serve", "--checkpoint", str(trained[0]), "--host", "0.0.0.0",
               "--port", str(port)]
    refused = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2
    assert refused.stderr.strip() == ("lads serve: error: --host 0.0.0.0: the server would be reachable from the "
                                      "network with no API key; set one in LADS_API_KEY (or serve.api_key), or pass "
                                      "--insecure")
    for extra, variables, expected in (["--insecure"], {}, "warning: binding to 0.0.0.0"), \
                                      ([], {"LADS_API_KEY": "k"}, "lads serve: http://0.0.0.0"):
        proc = subprocess.Popen(command + extra, env={**env, **variables}, stdout=subprocess.PIPE, text=True)
        try:
            first = proc.stdout.readline()
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        assert first.startswith(expected), first


def test_api_key_is_needed_on_every_v1_call(trained, monkeypatch):
    """With a key (here from LADS_API_KEY) every /v1/* call without it, or with another, is a
    401 that says how to send it; with it (either header) the call is served. The page itself
    loads (it asks for the key)."""
    monkeypatch.setenv("LADS_API_KEY", "s3cret")
    client = TestClient(create_app(load_service(trained[0], [])))
    for path in ("/v1/health", "/v1/model", "/v1/examples", "/v1/examples/0"):
        for headers in ({}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer s3cre"}):
            answer = client.get(path, headers=headers)
            assert answer.status_code == 401 and "API key" in answer.json()["error"], (path, headers)
            assert answer.headers["www-authenticate"].startswith("Bearer")
        assert client.get(path, headers={"X-API-Key": "s3cret"}).status_code == 200
        assert client.get(path, headers={"Authorization": "Bearer s3cret"}).status_code == 200
    denied = client.post("/v1/predict", files={"image": ("x.png", png(), "image/png")}, data={"expression": ["a"]})
    assert denied.status_code == 401
    served = client.post("/v1/predict", files={"image": ("x.png", png(), "image/png")}, data={"expression": ["a"]},
                         headers={"X-API-Key": "s3cret"})
    assert served.status_code == 200
    assert client.get("/").status_code == 200


def test_each_client_gets_its_rate_and_then_429(trained):
    """serve.requests_per_minute=3: a client's 4th call in a burst is a 429 with Retry-After;
    another client is still served; the bucket refills at the rate."""
    from lads.serve import RateLimiter

    client = TestClient(create_app(load_service(trained[0], ["serve.requests_per_minute=3"])))
    codes = [client.get("/v1/health").status_code for _ in range(4)]
    assert codes == [200, 200, 200, 429]
    answer = client.get("/v1/health")
    assert "serve.requests_per_minute" in answer.json()["error"] and int(answer.headers["retry-after"]) >= 1
    other = TestClient(create_app(load_service(trained[0], ["serve.requests_per_minute=3"])), client=("10.0.0.2", 1))
    assert other.get("/v1/health").status_code == 200
    limiter = RateLimiter(60)  # one call a second
    assert [limiter.wait("a", now=0.0) for _ in range(60)] == [0] * 60
    assert limiter.wait("a", now=0.0) == 1 and limiter.wait("a", now=1.0) == 0 and limiter.wait("b", now=1.0) == 0


def test_work_beyond_max_concurrent_is_503_not_a_queue(trained):
    """serve.max_concurrent=1 while one prediction holds the model: another is refused at once
    with 503 and Retry-After, and served once the first is done."""
    import threading

    service = load_service(trained[0], ["serve.max_concurrent=1"])
    client = TestClient(create_app(service))
    inside, release = threading.Event(), threading.Event()
    original = service.runner.__call__

    def slow(*args, **kwargs):
        inside.set()
        release.wait(30)
        return original(*args, **kwargs)

    service.runner = type("Slow", (), {"__call__": staticmethod(slow)})()
    first = ThreadPoolExecutor(1).submit(post, client, png(), ["the red circle"])
    assert inside.wait(60)
    began = time.monotonic()
    busy = post(client, png(), ["the red circle"])
    assert busy.status_code == 503 and "serve.max_concurrent" in busy.json()["error"]
    assert busy.headers["retry-after"] == "1" and time.monotonic() - began < 5
    release.set()
    assert first.result(timeout=60).status_code == 200
    service.runner = type("Plain", (), {"__call__": staticmethod(original)})()
    assert post(client, png(), ["the red circle"]).status_code == 200


def test_an_upload_is_read_upright_as_lads_predict_reads_a_file(client):
    """A JPEG stored sideways with EXIF orientation 6 is turned upright before grounding."""
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (64, 48), (30, 200, 30)).save(buffer, format="JPEG", exif=exif)
    answer = post(client, buffer.getvalue(), ["the green square"])
    assert answer.status_code == 200, answer.text
    assert answer.json()["image_size"] == [48, 64]


def test_load_test_with_a_key_has_no_error(trained, tmp_path):
    """benchmarks/serve_load.py, small: the server runs with an API key that every request
    carries (a call without it gets 401, which the script checks); no request fails and the
    server's memory at the end stays near its level after warm-up."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "serve_load.py"), "--checkpoint", str(trained[0]),
                           "--requests", "24", "--warmup", "8", "--concurrency", "4", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    summary = json.loads((tmp_path / "serve_load.json").read_text())
    assert summary["requests"] == 24 and summary["errors"] == 0
    assert summary["rss_mb_end"] < 1.25 * summary["rss_mb_after_warmup"]
