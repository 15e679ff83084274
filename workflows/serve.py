"""`tessera serve`: an export (`tessera export`) as an HTTP prediction service on Ray Serve.

Each replica loads the export once (`workflows/predict.py:Predictor`, the encoders checked by
identity, the ONNX graph) and answers over a FastAPI ingress:

    POST /predict   application/json {"samples": [{key, text, image, audio, video}, ...]}
                    (media as base64; no paths or URLs), or multipart/form-data (one sample:
                    files image / audio / video, fields text and key); one result per sample
    GET  /healthz   Serve is alive (an application of its own: answered however busy the
                    prediction replicas are)
    GET  /readyz    the prediction application is running: its replicas loaded the model and
                    ran a warm-up batch (from Serve's controller; 503 with the replicas' states)
    GET  /metrics   Prometheus text of this replica: requests by status, samples, latency,
                    batch sizes
    GET  /docs      OpenAPI

A request's samples are decoded and checked in a thread of the replica (the shard stage's
own per-sample code: a bad sample gets the reason its reject line would give) — outside the
model call — and then go one by one to a `serve.batch` method that runs the encoders and the
ONNX head over whatever samples of any requests arrived together (up to max_batch_size, or
after batch_wait_ms). The body is read up to serve.max_request_bytes and refused beyond it
(413) before it is read whole, and within serve.read_timeout_s (408): a client that sends a
partial body and then nothing holds a replica slot for that long at most."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError
from ray import serve

from tessera.core.storage import Store
from tessera.preprocess.manifest import LineReject, parse_row
from tessera.preprocess.modality import registry
from tessera.preprocess.reject import Reject
from tessera.workflows.config import excerpt

log = logging.getLogger(__name__)

APPLICATION = "tessera"  # the prediction application's name in Serve
UNHEALTHY_AFTER = 3  # failed model calls in a row after which Serve replaces a replica

# the media a request carries inline, as base64 (by the registry: preprocess/modality.py)
MEDIA = {m.file_field: name for name, m in registry().items() if m.served_inline}


class SampleIn(BaseModel):
    """One sample, as a manifest row names it, its media inline (base64)."""

    model_config = ConfigDict(extra="forbid")
    key: str | None = None
    text: str | None = None
    image: str | None = None
    audio: str | None = None
    video: str | None = None


class PredictIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    samples: list[SampleIn]


PREDICT_IN = TypeAdapter(PredictIn)
app = FastAPI(title="tessera", description="predictions of a tessera export")


class TooLarge(Exception):
    pass


MAX_ERRORS = 20  # validation errors a 422 lists


def _invalid(error: ValidationError) -> JSONResponse:
    """422 with each error's place, message and a bounded excerpt of what was given (never the
    request echoed back: a 40 MB bad body gets a short answer; bytes that are not UTF-8 none)."""
    found = error.errors(include_url=False)
    detail = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"],
               **({} if isinstance(e.get("input"), bytes) or "input" not in e else {"input": excerpt(e["input"])})}
              for e in found[:MAX_ERRORS]]
    if len(found) > MAX_ERRORS:
        detail.append({"msg": f"... and {len(found) - MAX_ERRORS} more errors"})
    return _error(422, detail)


async def _body(request: Request, limit: int) -> bytes:
    """The request body, refused (TooLarge) as soon as it is known to exceed LIMIT bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"the body is {declared} bytes, over serve.max_request_bytes ({limit})")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge(f"the body is over serve.max_request_bytes ({limit})")
        chunks.append(chunk)
    return b"".join(chunks)


def _error(status: int, detail) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status)


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=256)
@serve.ingress(app)
class PredictionService:
    def __init__(self, model: Store, variant: str, settings: dict, bundle: bool = False):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        from tessera.workflows.predict import Predictor

        self.settings = settings
        self.predictor = Predictor(model, variant, bundle=bundle)  # (the store pickles as its URL and options)
        meta = self.predictor.meta
        self.identity = {"export": model.url, "variant": variant, "bundle": bundle,
                         "checkpoint": meta.checkpoint, "tasks": [t.name for t in self.predictor.tasks],
                         "dims": meta.dims}
        self.score_batch.set_max_batch_size(settings["max_batch_size"])
        self.score_batch.set_batch_wait_timeout_s(settings["batch_wait_ms"] / 1000)
        self.registry = CollectorRegistry()
        self.requests = Counter("tessera_requests", "HTTP requests by status", ["status"], registry=self.registry)
        self.samples = Counter("tessera_samples", "samples answered, by outcome", ["outcome"], registry=self.registry)
        self.latency = Histogram("tessera_request_seconds", "request latency", registry=self.registry,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.batches = Histogram("tessera_batch_size", "samples per model call", registry=self.registry,
                                 buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        # warm-up: one text sample through the whole path before /readyz says yes
        row = parse_row({"key": "warm-up", "text": "warm up"}, 1, "/", self.predictor.shard_cfg)
        self.predictor.score_prepared([(row, self.predictor.prepare(row, {}))])
        self.failed_batches = 0  # model calls that raised in a row: check_health's measure

    def check_health(self) -> None:
        """Called by Serve's controller: a replica whose model calls keep failing is replaced."""
        if self.failed_batches >= UNHEALTHY_AFTER:
            raise RuntimeError(f"the last {self.failed_batches} model calls failed")

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def score_batch(self, prepared: list) -> list[dict]:
        self.batches.observe(len(prepared))
        try:
            scored = await asyncio.to_thread(self.predictor.score_prepared, prepared)
        except Exception:
            self.failed_batches += 1
            raise
        self.failed_batches = 0
        return scored

    def _prepared(self, samples: list[SampleIn]) -> list:
        """(row, stored sample or reject) per sample: decoding and checks, no model."""
        out = []
        for line, sample in enumerate(samples, start=1):
            fields = sample.model_dump(exclude_none=True)
            row = raw = None
            try:
                raw = {}
                for field, modality in MEDIA.items():
                    if field in fields:
                        try:
                            raw[modality] = base64.b64decode(fields[field], validate=True)
                        except (binascii.Error, ValueError):
                            raise Reject("request.bad_base64", f"{field} is not valid base64", modality) from None
                        if not raw[modality]:
                            raise Reject("input.empty", "empty file", modality)
                        fields[field] = f"/request/{field}"  # the bytes are in the request
                fields.setdefault("key", str(line))
                row = parse_row(fields, line, "/", self.predictor.shard_cfg)
                out.append((row, self.predictor.prepare(row, raw)))
            except Reject as r:
                out.append((None, LineReject.of(line, fields.get("key"), r)))
        return out

    async def _answer(self, samples: list[SampleIn]) -> JSONResponse:
        if len(samples) > self.settings["max_samples_per_request"]:
            return _error(413, f"{len(samples)} samples, over serve.max_samples_per_request "
                               f"({self.settings['max_samples_per_request']})")
        prepared = await asyncio.to_thread(self._prepared, samples)
        results = await asyncio.wait_for(
            asyncio.gather(*(self.score_batch(p) for p in prepared)), self.settings["request_timeout_s"])
        answered = []
        for record in results:
            if record.get("rejected"):
                self.samples.labels("rejected").inc()
                answered.append({"key": record["key"], "error": record["reason"]})
            else:
                self.samples.labels("predicted").inc()
                answered.append({"key": record["key"], "predictions": record["predictions"],
                                 "scores": record["scores"]})
        return JSONResponse({"model": self.identity, "results": answered})

    @app.post("/predict")
    async def predict(self, request: Request):
        started = time.perf_counter()
        try:
            response = await self._predict(request)
        except Exception as e:  # counted like every answer, and said in one line
            log.exception("answering a request")
            response = _error(500, f"internal error: {type(e).__name__}")
        self.requests.labels(str(response.status_code)).inc()
        self.latency.observe(time.perf_counter() - started)
        return response

    async def _predict(self, request: Request):
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind not in ("application/json", "multipart/form-data"):
            return _error(415, f"unsupported content type {kind or '(none)'!r}: application/json or "
                               "multipart/form-data")
        try:  # a client that sends its body slowly, or part of it and then nothing, holds a slot meanwhile
            body = await asyncio.wait_for(_body(request, self.settings["max_request_bytes"]),
                                          self.settings["read_timeout_s"])
        except TooLarge as e:
            return _error(413, str(e))
        except TimeoutError:
            return _error(408, f"the body did not arrive within serve.read_timeout_s "
                               f"({self.settings['read_timeout_s']} s)")
        try:
            if kind == "application/json":
                samples = PREDICT_IN.validate_json(body).samples
            else:
                samples = [await self._form_sample(request, body)]
        except ValidationError as e:
            return _invalid(e)
        try:
            return await self._answer(samples)
        except TimeoutError:
            return _error(504, f"not answered within serve.request_timeout_s ({self.settings['request_timeout_s']} s)")

    async def _form_sample(self, request: Request, body: bytes) -> SampleIn:
        async def replay():
            return {"type": "http.request", "body": body, "more_body": False}

        form = await Request(request.scope, replay).form(max_part_size=self.settings["max_request_bytes"])
        fields = {}
        for name, value in form.multi_items():
            if name in MEDIA:
                value = base64.b64encode(await value.read()).decode() if hasattr(value, "read") else value
            fields[name] = value
        return SampleIn.model_validate(fields)


    @app.get("/metrics")
    async def metrics(self):
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return PlainTextResponse(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


health = FastAPI(title="tessera health", docs_url=None, redoc_url=None, openapi_url=None)
READY_CACHE_S = 1.0  # how long a readiness answer (the controller's status) is reused


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
@serve.ingress(health)
class HealthService:
    """/healthz and /readyz, in an application of their own (each on its route), so that they
    are answered however many requests hold the prediction replicas' slots (a liveness probe
    must not restart a busy service): alive while Serve routes; ready while the prediction
    application is running (the controller's status, not a flag a replica sets for itself)."""

    def __init__(self, what: str, application: str):
        self.what, self.application = what, application
        self.checked, self.answer = 0.0, ("", {})

    @health.get("/")
    async def answer(self):
        if self.what == "alive":
            return {"status": "alive"}
        if time.monotonic() - self.checked > READY_CACHE_S:
            status = await asyncio.to_thread(serve.status)
            app = status.applications.get(self.application)
            state = app.status if app is not None else "NOT_STARTED"
            self.answer = (state, {name: d.replica_states for name, d in app.deployments.items()} if app else {})
            self.checked = time.monotonic()
        state, replicas = self.answer
        if state != "RUNNING":
            return _error(503, {"status": str(state), "replicas": replicas})
        return {"status": "ready", "replicas": replicas}


def run_service(cfg, model: Store, variant: str, host: str, port: int, bundle: bool = False) -> None:
    """Deploy MODEL (an export URL) with CFG.serve's settings on the running Ray and serve on
    HOST:PORT until SIGINT / SIGTERM (with BUNDLE, its ONNX encoders: no torch in the
    replicas); then shut down, letting in-flight requests finish."""
    import signal
    import threading

    settings = cfg.serve.model_dump()
    up, done = threading.Event(), threading.Event()

    def stop(*_) -> None:
        if not up.is_set():  # still deploying: interrupt that
            raise KeyboardInterrupt
        done.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    try:
        serve.start(http_options={"host": host, "port": port}, proxy_location=cfg.serve.proxy_location)
        deployment = PredictionService.options(num_replicas=cfg.serve.replicas,
                                               ray_actor_options={"num_cpus": cfg.serve.cpus_per_replica},
                                               max_ongoing_requests=cfg.serve.max_ongoing_requests)
        serve.run(deployment.bind(model, variant, settings, bundle), name=APPLICATION,
                  route_prefix="/")
        for what, route in (("alive", "/healthz"), ("ready", "/readyz")):
            serve.run(HealthService.bind(what, APPLICATION), name=f"health-{what}", route_prefix=route)
        up.set()
        log.info("serving %s (%s) at http://%s:%d (%d replicas)", model.url, variant, host, port, cfg.serve.replicas)
        print(json.dumps({"url": f"http://{host}:{port}", "replicas": cfg.serve.replicas, "variant": variant,
                          "bundle": bundle}), flush=True)
        done.wait()
    except KeyboardInterrupt:
        log.info("stopped while deploying")
    finally:
        serve.shutdown()
