"""A web page to try a model and an HTTP API to call it (FastAPI + uvicorn): ``serve``, which
``lads serve`` calls, or ``create_app(load_service(...))`` for an ASGI server of one's own.

One model and one cache of subnets serve every request; inference runs in FastAPI's thread pool,
outside the event loop, one request at a time (a lock: the model and its cache are shared).
Endpoints: ``GET /`` (the page), ``POST /v1/predict``, ``GET /v1/health``, ``GET /v1/model``,
``GET /v1/examples`` and ``GET /v1/examples/{i}`` (a few test images of the model's own
dataset, by number: no path from a request is ever opened), OpenAPI at ``/docs``.

Exposed beyond this machine (docs/design.md §5b): with an API key (``LADS_API_KEY`` or
``serve.api_key``) every ``/v1/*`` call carries it (``Authorization: Bearer KEY`` or
``X-API-Key: KEY``, compared in constant time; 401 without); each client address may make
``serve.requests_per_minute`` calls (429 beyond, with ``Retry-After``); at most
``serve.max_concurrent`` predictions run or wait (503 beyond). Binding beyond localhost without
a key is refused unless ``--insecure`` (``insecure=True``).
"""

import base64
import hmac
import io
import math
import os
import threading
import time
from pathlib import Path

from lads.errors import LadsError

DEMO_CHECKPOINT = Path("runs/demo/lads/checkpoint")
API_KEY_VARIABLE = "LADS_API_KEY"
PAGE = Path(__file__).parent / "static" / "serve.html"


# ----------------------------------------------------------------------------- the service


class Service:
    """The model behind the endpoints: checks a request's input, runs it under a lock, and
    describes each expression's subnet. ``settings``: ``ServeConfig``."""

    def __init__(self, model, settings, examples: list[Path] = ()):
        from lads.inference import SubnetRunner
        from lads.util.amp import DTYPES

        self.model = model.eval()
        self.settings = settings
        self.examples = list(examples)
        if settings.dtype not in DTYPES:
            raise LadsError(f"serve.dtype must be one of {', '.join(DTYPES)}, got {settings.dtype!r}")
        self.runner = SubnetRunner(self.model, amp=DTYPES[settings.dtype])
        self.lock = threading.Lock()
        self.api_key = settings.api_key or os.environ.get(API_KEY_VARIABLE) or None
        if settings.max_concurrent < 1 or settings.requests_per_minute < 0:
            raise LadsError("serve.max_concurrent must be at least 1 and serve.requests_per_minute at least 0 "
                            f"(0: no limit), got {settings.max_concurrent} and {settings.requests_per_minute}")
        self.slots = threading.BoundedSemaphore(settings.max_concurrent)
        self.limiter = RateLimiter(settings.requests_per_minute)

    def authorized(self, headers) -> bool:
        """No key set, or the request carries it (``Authorization: Bearer`` or ``X-API-Key``)."""
        if self.api_key is None:
            return True
        given = headers.get("x-api-key") or headers.get("authorization", "").removeprefix("Bearer ").strip()
        return hmac.compare_digest(given.encode(), self.api_key.encode())

    def read_image(self, data: bytes):
        """A PIL image from uploaded bytes, or a ``RequestError`` saying what is wrong with them."""
        from PIL import Image, UnidentifiedImageError

        from lads.util.image import upright_rgb

        s = self.settings
        if not data:
            raise RequestError(400, "the image is empty (0 bytes)")
        if len(data) > s.max_image_mb * 2**20:
            raise RequestError(413, f"the image has {len(data) / 2**20:.1f} MB; the limit is {s.max_image_mb:g} MB "
                                    "(serve.max_image_mb)")
        try:
            image = Image.open(io.BytesIO(data))
        except (UnidentifiedImageError, OSError):
            raise RequestError(415, "the upload is not an image that Pillow can read (JPEG, PNG, WebP, …)") from None
        except Image.DecompressionBombError as e:
            raise RequestError(413, f"the image has too many pixels ({e}); the limit is {s.max_megapixels:g} "
                                    "megapixels (serve.max_megapixels)") from None
        megapixels = image.width * image.height / 1e6
        if megapixels > s.max_megapixels:
            raise RequestError(413, f"the image has {megapixels:.1f} megapixels ({image.width} × {image.height}); "
                                    f"the limit is {s.max_megapixels:g} (serve.max_megapixels)")
        try:
            return upright_rgb(image)
        except (OSError, SyntaxError, ValueError) as e:
            raise RequestError(400, f"the image is truncated or corrupt ({e})") from None

    def check_expressions(self, expressions) -> list[str]:
        s = self.settings
        if not isinstance(expressions, list) or not all(isinstance(e, str) for e in expressions):
            raise RequestError(422, "expressions: expected a list of strings")
        if not expressions:
            raise RequestError(422, "expressions: give at least one")
        if len(expressions) > s.max_expressions:
            raise RequestError(422, f"{len(expressions)} expressions; at most {s.max_expressions} per request "
                                    "(serve.max_expressions)")
        for i, e in enumerate(expressions):
            if not e.strip():
                raise RequestError(422, f"expression {i + 1} is empty")
            if len(e) > s.max_expression_chars:
                raise RequestError(422, f"expression {i + 1} has {len(e)} characters; at most "
                                        f"{s.max_expression_chars} (serve.max_expression_chars)")
        return expressions

    def predict(self, data: bytes, expressions, dense: bool = False, drawing: bool = False) -> dict:
        """What ``lads predict`` prints for each expression, with its subnet's FLOPs and whether
        it came from the cache; the times of the call (ms); optionally the subnets drawn (PNG)."""
        from lads.inference import ground_image

        image = self.read_image(data)
        expressions = self.check_expressions(expressions)
        started = time.perf_counter()
        with self.lock:
            result, predictions = ground_image(self.model, self.runner, image, expressions,
                                               "dense" if dense else "subnet")
        out = {"predictions": predictions, "mode": "dense" if dense else "subnet",
               "image_size": [image.width, image.height],
               "times_ms": {k: round(1000 * v, 2) for k, v in result["times"].items()},
               "wall_ms": round(1000 * (time.perf_counter() - started), 2)}
        if drawing:
            out["subnets_png"] = self.draw(result["gates"], expressions)
        return out

    def draw(self, gates, expressions) -> str:
        """Fig. 6 of ``lads analyze`` for these expressions, as base64 PNG."""
        from lads.analysis.figures import subnet_drawings

        buffer = io.BytesIO()
        subnet_drawings(gates.layer.float().cpu().numpy(), gates.filter.float().cpu().numpy(), expressions,
                        self.model.layout, buffer)
        return base64.b64encode(buffer.getvalue()).decode()

    def describe_model(self) -> dict:
        from lads.config import to_dict
        from lads.util.dist import device_name

        parameter = next(self.model.parameters())
        layout = self.model.layout
        return {"config": to_dict(self.model.config), "parameters": self.model.parameter_counts(),
                "device": device_name(parameter.device.type), "dtype": str(parameter.dtype).removeprefix("torch."),
                "dense": self.model.gating is None, "bottlenecks": layout.num_visual,
                "fusion_sublayers": len(layout.candidates) - layout.num_visual, "filters": layout.num_filter_gates}


class RequestError(Exception):
    """A request refused: an HTTP status, a message for the caller, and when to retry (seconds)."""

    def __init__(self, status: int, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.retry_after = status, message, retry_after

    def response(self):
        from fastapi.responses import JSONResponse

        headers = {"WWW-Authenticate": 'Bearer realm="lads"'} if self.status == 401 else {}
        if self.retry_after is not None:
            headers["Retry-After"] = str(self.retry_after)
        return JSONResponse({"error": self.message}, status_code=self.status, headers=headers)


class RateLimiter:
    """A token bucket per client: ``per_minute`` calls in a burst, refilled at ``per_minute`` / 60
    per second (0: no limit). Full buckets are forgotten, so memory stays bounded."""

    FORGET_ABOVE = 4096  # clients remembered before the full buckets are dropped

    def __init__(self, per_minute: int):
        self.per_minute, self.buckets, self.lock = per_minute, {}, threading.Lock()

    def wait(self, client: str, now: float | None = None) -> int:
        """0 when ``client`` may call now (and the call is counted), else seconds to wait."""
        if not self.per_minute:
            return 0
        now = time.monotonic() if now is None else now
        rate = self.per_minute / 60
        with self.lock:
            tokens, last = self.buckets.get(client, (self.per_minute, now))
            tokens = min(self.per_minute, tokens + (now - last) * rate)
            if len(self.buckets) > self.FORGET_ABOVE:
                self.buckets = {c: (t, s) for c, (t, s) in self.buckets.items()
                                if t + (now - s) * rate < self.per_minute}
            allowed = tokens >= 1
            self.buckets[client] = (tokens - 1 if allowed else tokens, now)
        return 0 if allowed else math.ceil((1 - tokens) / rate)


# ----------------------------------------------------------------------------- the app


def create_app(service: Service):
    """The FastAPI application around ``service``."""
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, Response
    from starlette.concurrency import run_in_threadpool

    from lads import __version__

    app = FastAPI(title="lads", version=__version__,
                  description="Referring expression comprehension with Language Adaptive Dynamic Subnets: "
                              "a box per expression, each found by the subnet its expression chose.")

    @app.exception_handler(RequestError)
    def request_error(_: Request, error: RequestError):
        return error.response()

    @app.middleware("http")
    async def guard(request: Request, call_next):
        """The API key, then the client's rate, for every ``/v1/*`` call."""
        if request.url.path.startswith("/v1/"):
            if not service.authorized(request.headers):
                return RequestError(401, "this server needs an API key: send 'Authorization: Bearer KEY' "
                                         "or 'X-API-Key: KEY'").response()
            wait = service.limiter.wait(request.client.host if request.client else "?")
            if wait:
                return RequestError(429, f"more than {service.settings.requests_per_minute} calls a minute from "
                                         "this client (serve.requests_per_minute)", retry_after=wait).response()
        return await call_next(request)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page():
        return PAGE.read_text()

    @app.get("/v1/health")
    def health():
        return {"status": "ok"}

    @app.get("/v1/model")
    def model_info():
        return service.describe_model()

    @app.get("/v1/examples")
    def examples():
        return {"examples": [{"id": i, "name": p.name, "url": f"/v1/examples/{i}"}
                             for i, p in enumerate(service.examples)]}

    @app.get("/v1/examples/{index}")
    def example(index: int):
        if not 0 <= index < len(service.examples):
            raise RequestError(404, f"no example {index}; there are {len(service.examples)}")
        return Response(service.examples[index].read_bytes(), media_type="image/png")

    @app.post("/v1/predict", openapi_extra=PREDICT_REQUEST)
    async def predict(request: Request):
        """Boxes for one image and its expressions: multipart (an ``image`` file, ``expression``
        fields) or JSON (``image`` as base64, ``expressions``); ``dense`` runs every gate open,
        ``drawing`` adds the subnets drawn as a PNG (base64)."""
        limit = service.settings.max_image_mb * 2**20 + 2**20  # the image and the fields
        if int(request.headers.get("content-length") or 0) > limit:
            raise RequestError(413, f"the request is over {service.settings.max_image_mb:g} MB (serve.max_image_mb)")
        kind = request.headers.get("content-type", "")
        if kind.startswith("multipart/form-data"):
            form = await request.form()
            upload = form.get("image")
            if upload is None or isinstance(upload, str):
                raise RequestError(422, "image: expected a file field named 'image'")
            data, expressions = await upload.read(), form.getlist("expression")
            dense, drawing = (form.get(k, "false").lower() in ("1", "true", "on") for k in ("dense", "drawing"))
        elif kind.startswith("application/json"):
            try:
                body = await request.json()
                data = base64.b64decode(body["image"], validate=True)
            except (ValueError, KeyError, TypeError):
                raise RequestError(400, "expected a JSON object with 'image' (base64) and 'expressions'") from None
            expressions, dense, drawing = body.get("expressions"), bool(body.get("dense")), bool(body.get("drawing"))
        else:
            raise RequestError(415, "send multipart/form-data or application/json")
        if not service.slots.acquire(blocking=False):  # taken here: no queue grows in the thread pool
            raise RequestError(503, f"busy: {service.settings.max_concurrent} predictions are running or waiting "
                                    "(serve.max_concurrent); try again shortly", retry_after=1)
        try:
            return await run_in_threadpool(service.predict, data, expressions, dense, drawing)
        finally:
            service.slots.release()

    return app


PREDICT_REQUEST = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["image", "expression"], "properties": {
        "image": {"type": "string", "format": "binary"},
        "expression": {"type": "array", "items": {"type": "string"}},
        "dense": {"type": "boolean"}, "drawing": {"type": "boolean"}}}},
    "application/json": {"schema": {"type": "object", "required": ["image", "expressions"], "properties": {
        "image": {"type": "string", "format": "byte"},
        "expressions": {"type": "array", "items": {"type": "string"}},
        "dense": {"type": "boolean"}, "drawing": {"type": "boolean"}}}}}}}


# ----------------------------------------------------------------------------- the server


def load_service(checkpoint, overrides: list[str]) -> Service:
    """The model of ``checkpoint`` with its settings (the checkpoint's config, ``serve.*``
    overrides on top) and up to 8 example images from its dataset's test split, if present."""
    from lads.config import apply_overrides, config_from_dict, to_dict
    from lads.models.pretrained import load_model

    for item in overrides:
        if not item.startswith("serve."):
            raise LadsError(f"--set {item}: lads serve takes serve.* settings only")
    checkpoint = Path(checkpoint) if checkpoint else DEMO_CHECKPOINT
    if not (checkpoint / "meta.json").exists():
        hint = " (run `bash scripts/demo.sh` first, or give --checkpoint DIR)" if checkpoint == DEMO_CHECKPOINT else ""
        raise LadsError(f"--checkpoint {checkpoint}: no trained model there{hint}")
    model, cfg = load_model(checkpoint)
    cfg = config_from_dict(apply_overrides(to_dict(cfg), overrides))
    return Service(model, cfg.serve, _examples(cfg))


def _examples(cfg, count: int = 8) -> list[Path]:
    from lads.datasets import load_records

    try:
        records, _ = load_records(cfg.data.path, "test")
    except LadsError:
        return []
    return sorted({Path(r.image) for r in records if Path(r.image).is_file()})[:count]


def serve(checkpoint=None, overrides: list[str] = (), host: str | None = None, port: int | None = None,
          insecure: bool = False) -> None:
    """Serve ``checkpoint`` (default: the demo's LADS; ``serve.*`` ``overrides``) on ``host``:``port``
    (default: its ``serve.host`` and ``serve.port``) until stopped; beyond localhost only with an API
    key, or ``insecure``."""
    import uvicorn

    service = load_service(checkpoint, list(overrides))
    host = host or service.settings.host
    port = port or service.settings.port
    if host not in ("127.0.0.1", "localhost", "::1") and service.api_key is None:
        if not insecure:
            raise LadsError(f"--host {host}: the server would be reachable from the network with no API key; "
                            f"set one in {API_KEY_VARIABLE} (or serve.api_key), or pass --insecure")
        print(f"warning: binding to {host}: the server is reachable from the network, and it has no "
              "authentication (--insecure)", flush=True)
    print(f"lads serve: http://{host}:{port}/ (API docs at /docs)", flush=True)
    uvicorn.run(create_app(service), host=host, port=port, log_level="warning")
