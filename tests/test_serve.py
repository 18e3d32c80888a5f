"""``lads serve``: every endpoint through FastAPI's test client, each kind of bad input, and
concurrent requests that each get their own boxes."""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from lads.errors import LadsError

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from lads.commands.serve import create_app, load_service  # noqa: E402


@pytest.fixture(scope="module")
def service(trained):
    return load_service(trained[0], ["serve.max_expressions=4", "serve.max_megapixels=0.5",
                                     "serve.max_image_mb=1", "serve.max_expression_chars=80"])


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


def test_binding_beyond_this_machine_warns(trained):
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "HF_HUB_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lads.cli", "serve", "--checkpoint", str(trained[0]),
                             "--host", "0.0.0.0", "--port", str(port)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert first.startswith("warning: binding to 0.0.0.0: the server is reachable from the network")


def test_an_upload_is_read_upright_as_lads_predict_reads_a_file(client):
    """A JPEG stored sideways with EXIF orientation 6 is turned upright before grounding."""
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (64, 48), (30, 200, 30)).save(buffer, format="JPEG", exif=exif)
    answer = post(client, buffer.getvalue(), ["the green square"])
    assert answer.status_code == 200, answer.text
    assert answer.json()["image_size"] == [48, 64]
