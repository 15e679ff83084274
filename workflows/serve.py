"""`tessera serve`: an export (`tessera export`) as an HTTP prediction service on Ray Serve.

Each replica loads the export once (`workflows/predict.py:Predictor`, the encoders checked by
identity, the ONNX graph) and answers over a FastAPI ingress with the routes, limits and
metrics of `workflows/service.py` (its answers say `served_by: cloud`); a `serve.batch` method
runs the encoders and the ONNX head over whatever samples of any requests arrived together (up
to max_batch_size, or after batch_wait_ms). /healthz and /readyz are applications of their
own: answered however busy the prediction replicas are, ready when Serve's controller says the
replicas loaded the model and ran a warm-up batch (503 with the replicas' states before)."""

# (no `from __future__ import annotations`: Serve pickles the deployment class by value, with
# only the globals its code names, so a route's annotation left as the string "Request"
# could not be resolved in the replica and FastAPI would read `request` as a query field)
import asyncio
import json
import logging
import time

from fastapi import FastAPI, Request
from ray import serve

from tessera.core.storage import Store
from tessera.workflows.service import PredictionHandler, error_response, model_identity

log = logging.getLogger(__name__)

APPLICATION = "tessera"  # the prediction application's name in Serve
UNHEALTHY_AFTER = 3  # failed model calls in a row after which Serve replaces a replica

app = FastAPI(title="tessera", description="predictions of a tessera export")


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=256)
@serve.ingress(app)
class PredictionService:
    def __init__(self, model: Store, variant: str, settings: dict, bundle: bool = False):
        from tessera.workflows.predict import Predictor

        predictor = Predictor(model, variant, bundle=bundle)  # (the store pickles as its URL and options)
        self.handler = PredictionHandler(predictor, model_identity(model, variant, bundle, predictor), settings,
                                         self.score_batch, served_by="cloud")
        self.score_batch.set_max_batch_size(settings["max_batch_size"])
        self.score_batch.set_batch_wait_timeout_s(settings["batch_wait_ms"] / 1000)
        self.handler.warm_up()
        self.failed_batches = 0  # model calls that raised in a row: check_health's measure

    def check_health(self) -> None:
        """Called by Serve's controller: a replica whose model calls keep failing is replaced."""
        if self.failed_batches >= UNHEALTHY_AFTER:
            raise RuntimeError(f"the last {self.failed_batches} model calls failed")

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)
    async def score_batch(self, prepared: list) -> list[dict]:
        self.handler.batches.observe(len(prepared))
        try:
            scored = await asyncio.to_thread(self.handler.predictor.score_prepared, prepared)
        except Exception:
            self.failed_batches += 1
            raise
        self.failed_batches = 0
        return scored

    @app.post("/predict")
    async def predict(self, request: Request):
        return await self.handler.predict(request)

    @app.get("/metrics")
    async def metrics(self):
        return self.handler.metrics()


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
            return error_response(503, {"status": str(state), "replicas": replicas})
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
