"""What `tessera serve` answers, on either runtime: the routes' request handling, limits,
metrics and the fallback to another service, with no Ray in it. `workflows/serve.py` runs it
in Ray Serve replicas, `workflows/edge.py` in one process (no Ray, no torch).

    POST /predict   application/json {"samples": [{key, text, image, audio, video}, ...]}
                    (media as base64; no paths or URLs), or multipart/form-data (one sample:
                    files image / audio / video, fields text and key); one result per sample
    GET  /healthz   alive;  GET /readyz  the model is loaded and warmed up
    GET  /metrics   Prometheus text: requests by status, samples by outcome and by who
                    answered them, latency, batch sizes, fallback latency and breaker state
    GET  /docs      OpenAPI

A request's samples are decoded and checked in a thread (the shard stage's own per-sample
code: a bad sample gets the reason its reject line would give) — outside the model call — and
then go one by one to the runtime's batcher, which scores whatever samples of any requests
arrived together. The body is read up to serve.max_request_bytes and refused beyond it (413)
before it is read whole, and within serve.read_timeout_s (408).

With serve.fallback.url, a sample the model is not sure of (its top probability under
min_confidence: of the first classification task, or of each one named) or that carries a
modality the model does not take is sent on to that service (one request per incoming
request) and its answer replaces this one's (`served_by: cloud`); when that service fails,
times out or its circuit breaker is open, this model's answer stands with `degraded: true` —
never an error for it."""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import time
from collections.abc import Awaitable, Callable

from fastapi import Request
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from tessera.core.errors import ConfigError
from tessera.preprocess.manifest import LineReject, parse_row
from tessera.preprocess.modality import registry
from tessera.preprocess.reject import Reject
from tessera.workflows.config import FallbackConfig, excerpt

log = logging.getLogger(__name__)

# the media a request carries inline, as base64 (by the registry: preprocess/modality.py)
MEDIA = {m.file_field: name for name, m in registry().items() if m.served_inline}
MAX_ERRORS = 20  # validation errors a 422 lists
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


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


class TooLarge(Exception):
    pass


def error_response(status: int, detail) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status)


def _invalid(error: ValidationError) -> JSONResponse:
    """422 with each error's place, message and a bounded excerpt of what was given (never the
    request echoed back: a 40 MB bad body gets a short answer; bytes that are not UTF-8 none)."""
    found = error.errors(include_url=False)
    detail = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"],
               **({} if isinstance(e.get("input"), bytes) or "input" not in e else {"input": excerpt(e["input"])})}
              for e in found[:MAX_ERRORS]]
    if len(found) > MAX_ERRORS:
        detail.append({"msg": f"... and {len(found) - MAX_ERRORS} more errors"})
    return error_response(422, detail)


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


class Fallback:
    """The service unsure samples go on to: its client (retries within timeout_s each) behind a
    circuit breaker (pybreaker: open after `breaker_failures` failed requests in a row, one
    probe after `breaker_cooldown_s`)."""

    def __init__(self, cfg: FallbackConfig, tasks: list):
        import pybreaker
        import requests
        from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

        self.cfg, self.session = cfg, requests.Session()
        classifying = [t.name for t in tasks if t.kind == "classification"]  # (where a top probability means sure)
        if not classifying:
            raise ConfigError("serve.fallback needs a classification task to measure confidence; this model has "
                              f"{[t.name for t in tasks]}")
        self.thresholds = cfg.thresholds(classifying[0])
        unknown = sorted(set(self.thresholds) - set(classifying))
        if unknown:
            raise ConfigError(f"serve.fallback.min_confidence names {unknown}, not classification tasks of this "
                              f"model ({classifying})")
        self.breaker = pybreaker.CircuitBreaker(fail_max=cfg.breaker_failures, reset_timeout=cfg.breaker_cooldown_s,
                                                name="fallback")
        # one request, tried again on a lost connection, a timeout or a 5xx (each try bounded by timeout_s)
        self.post = Retrying(stop=stop_after_attempt(cfg.retries + 1), wait=wait_exponential(0.05, max=1), reraise=True,
                             retry=retry_if_exception_type((requests.ConnectionError, requests.Timeout, ServerError))
                             ).wraps(self._post)

    def unsure(self, record: dict) -> bool:
        """Whether a scored record's top probability is under its task's threshold."""
        scores = record.get("scores", {})
        return any(task in scores and max(scores[task].values()) < bound for task, bound in self.thresholds.items())

    def settle(self, samples: list[dict], results: list[dict], modalities: set[str]) -> bool:
        """RESULTS (this model's, one per sample of SAMPLES: request samples, media inline), in
        place: each predicted one this model is not sure of, or whose sample carries a modality
        not in MODALITIES, replaced by the service's answer (`served_by: cloud`), or marked
        `degraded` when the service cannot give one. Whether any sample was sent."""
        wanted = [i for i, (sample, result) in enumerate(zip(samples, results, strict=True)) if "predictions" in result
                  and (self.unsure(result) or {MEDIA[field] for field in MEDIA if field in sample} - modalities)]
        if not wanted:
            return False
        try:
            answers = self.ask([samples[i] for i in wanted])
        except Exception as e:  # down, slow, wrong, or the breaker open: this model's answer stands
            import pybreaker

            said = log.debug if isinstance(e, pybreaker.CircuitBreakerError) else log.warning  # (once, not per request)
            said("fallback %s did not answer (%s: %s): %d samples answered here, degraded",
                 self.cfg.url, type(e).__name__, e, len(wanted))
            answers = [{}] * len(wanted)
        for i, answer in zip(wanted, answers, strict=True):
            if "predictions" in answer:  # (a sample the service rejects keeps this model's answer)
                results[i].update(predictions=answer["predictions"], scores=answer["scores"], served_by="cloud")
            else:
                results[i]["degraded"] = True
        return True

    def ask(self, samples: list[dict]) -> list[dict]:
        """The service's results for SAMPLES, in order (raises when it cannot answer, or the
        breaker is open)."""
        return self.breaker.call(self.post, samples)

    def _post(self, samples: list[dict]) -> list[dict]:
        response = self.session.post(self.cfg.url.rstrip("/") + "/predict", json={"samples": samples},
                                     timeout=self.cfg.timeout_s)
        if response.status_code >= 500:
            raise ServerError(f"{self.cfg.url} answered {response.status_code}")
        response.raise_for_status()
        results = response.json()["results"]
        if len(results) != len(samples):
            raise ValueError(f"{self.cfg.url} answered {len(results)} results for {len(samples)} samples")
        return results


class ServerError(Exception):
    pass


def model_identity(model, variant: str, bundle: bool, predictor) -> dict:
    """What a response's `model` says it was answered by (MODEL: the export's Store)."""
    meta = predictor.meta
    return {"export": model.url, "variant": variant, "bundle": bundle, "checkpoint": meta.checkpoint,
            "tasks": [t.name for t in predictor.tasks], "dims": meta.dims}


class PredictionHandler:
    """The routes' logic over a Predictor; SCORE is the runtime's batcher (one prepared sample
    in, its record out); SERVED_BY what this runtime's answers say they are (edge, cloud)."""

    def __init__(self, predictor, identity: dict, settings: dict, score: Callable[[tuple], Awaitable[dict]],
                 served_by: str):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.predictor, self.identity, self.settings, self.score = predictor, identity, settings, score
        self.served_by = served_by
        self.modalities = set(predictor.meta.dims)
        fallback = settings.get("fallback") or {}
        self.fallback = Fallback(FallbackConfig.model_validate(fallback), predictor.tasks) \
            if fallback.get("url") else None
        self.registry = CollectorRegistry()
        self.requests = Counter("tessera_requests", "HTTP requests by status", ["status"], registry=self.registry)
        self.samples = Counter("tessera_samples", "samples answered, by outcome", ["outcome"], registry=self.registry)
        self.served = Counter("tessera_samples_served", "samples predicted, by who answered and whether the "
                              "fallback was wanted but failed", ["served_by", "degraded"], registry=self.registry)
        self.latency = Histogram("tessera_request_seconds", "request latency", registry=self.registry,
                                 buckets=LATENCY_BUCKETS)
        self.batches = Histogram("tessera_batch_size", "samples per model call", registry=self.registry,
                                 buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.fallback_latency = Histogram("tessera_fallback_seconds", "fallback requests' latency",
                                          registry=self.registry, buckets=LATENCY_BUCKETS)
        self.breaker_open = Gauge("tessera_fallback_breaker_open", "1 while the fallback's circuit breaker is "
                                  "open (or half-open: probing)", registry=self.registry)

    def warm_up(self) -> None:
        """One text sample through the whole path, before the service says it is ready."""
        row = parse_row({"key": "warm-up", "text": "warm up"}, 1, "/", self.predictor.shard_cfg)
        self.predictor.score_prepared([(row, self.predictor.prepare(row, {}))])

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
            return error_response(413, f"{len(samples)} samples, over serve.max_samples_per_request "
                               f"({self.settings['max_samples_per_request']})")
        prepared = await asyncio.to_thread(self._prepared, samples)
        results = await asyncio.wait_for(asyncio.gather(*(self.score(p) for p in prepared)),
                                         self.settings["request_timeout_s"])
        answered = []
        for record in results:
            if record.get("rejected"):
                self.samples.labels("rejected").inc()
                answered.append({"key": record["key"], "error": record["reason"]})
            else:
                self.samples.labels("predicted").inc()
                answered.append({"key": record["key"], "predictions": record["predictions"],
                                 "scores": record["scores"], "served_by": self.served_by})
        if self.fallback is not None:
            await self._fall_back(samples, answered)
        for result in answered:
            if "served_by" in result:
                self.served.labels(result["served_by"], str(result.get("degraded", False)).lower()).inc()
        return JSONResponse({"model": self.identity, "results": answered})

    async def _fall_back(self, samples: list[SampleIn], answered: list[dict]) -> None:
        started = time.perf_counter()
        asked = await asyncio.to_thread(self.fallback.settle, [s.model_dump(exclude_none=True) for s in samples],
                                        answered, self.modalities)
        if asked:
            self.fallback_latency.observe(time.perf_counter() - started)
        self.breaker_open.set(0 if self.fallback.breaker.current_state == "closed" else 1)

    async def predict(self, request: Request):
        started = time.perf_counter()
        try:
            response = await self._predict(request)
        except Exception as e:  # counted like every answer, and said in one line
            log.exception("answering a request")
            response = error_response(500, f"internal error: {type(e).__name__}")
        self.requests.labels(str(response.status_code)).inc()
        self.latency.observe(time.perf_counter() - started)
        return response

    async def _predict(self, request: Request):
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind not in ("application/json", "multipart/form-data"):
            return error_response(415, f"unsupported content type {kind or '(none)'!r}: application/json or "
                               "multipart/form-data")
        try:  # a client that sends its body slowly, or part of it and then nothing, holds a slot meanwhile
            body = await asyncio.wait_for(_body(request, self.settings["max_request_bytes"]),
                                          self.settings["read_timeout_s"])
        except TooLarge as e:
            return error_response(413, str(e))
        except TimeoutError:
            return error_response(408, f"the body did not arrive within serve.read_timeout_s "
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
            return error_response(504, "not answered within serve.request_timeout_s "
                                       f"({self.settings['request_timeout_s']} s)")

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

    def metrics(self) -> PlainTextResponse:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return PlainTextResponse(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)
