"""`tessera serve EXPORT --bundle --runtime edge`: the export's all-ONNX bundle served from one
process, with no Ray and no torch — for a gateway, a workstation, a small board. The routes,
request and response schema, status codes, limits and metrics are `workflows/service.py`'s,
as `tessera serve` on Ray Serve gives them (answers say `served_by: edge`); requests that
arrive together are scored together by an in-process batcher; uvicorn serves the app."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable

from fastapi import FastAPI, Request

from tessera.core.storage import Store

log = logging.getLogger(__name__)


class Batcher:
    """Prepared samples that arrive together, scored in one call in a thread: up to
    MAX_SIZE, or whatever came within WAIT_S of the first."""

    def __init__(self, score: Callable[[list], list[dict]], max_size: int, wait_s: float,
                 observe: Callable[[int], None]):
        self.score, self.max_size, self.wait_s, self.observe = score, max_size, wait_s, observe
        self.queue: asyncio.Queue | None = None

    async def __call__(self, prepared: tuple) -> dict:
        if self.queue is None:  # (made and drained on the serving loop)
            self.queue = asyncio.Queue()
            asyncio.get_running_loop().create_task(self._drain())
        answer = asyncio.get_running_loop().create_future()
        await self.queue.put((prepared, answer))
        return await answer

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.wait_s
            while len(batch) < self.max_size:
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), max(deadline - loop.time(), 0)))
                except TimeoutError:
                    break
            self.observe(len(batch))
            try:
                records = await asyncio.to_thread(self.score, [prepared for prepared, _ in batch])
            except Exception as e:  # each waiting request gets the error (a 500), the batcher goes on
                for _, answer in batch:
                    if not answer.done():
                        answer.set_exception(e)
                continue
            for (_, answer), record in zip(batch, records, strict=True):
                if not answer.done():  # (a request that timed out no longer waits)
                    answer.set_result(record)


def edge_app(model: Store, variant: str, settings: dict):
    """The FastAPI app serving MODEL's bundle (loaded and warmed up here, before it listens)."""
    from tessera.workflows.predict import Predictor
    from tessera.workflows.service import PredictionHandler, model_identity

    predictor = Predictor(model, variant, bundle=True)
    batcher = Batcher(predictor.score_prepared, settings["max_batch_size"], settings["batch_wait_ms"] / 1000,
                      lambda n: handler.batches.observe(n))
    handler = PredictionHandler(predictor, model_identity(model, variant, True, predictor), settings, batcher,
                                served_by="edge")
    handler.warm_up()
    app = FastAPI(title="tessera (edge)", description="predictions of a tessera export's ONNX bundle")

    @app.post("/predict")
    async def predict(request: Request):
        return await handler.predict(request)

    @app.get("/metrics")
    async def metrics():
        return handler.metrics()

    @app.get("/healthz")
    async def healthz():
        return {"status": "alive"}

    @app.get("/readyz")  # the model is loaded and warmed up before the app listens at all
    async def readyz():
        return {"status": "ready", "replicas": {"edge": {"RUNNING": 1}}}

    return app


def run_edge(cfg, model: Store, variant: str, host: str, port: int) -> None:
    """Serve MODEL's bundle on HOST:PORT until SIGINT / SIGTERM (uvicorn lets in-flight requests
    finish): the service's normal end, exit 0, as on Ray Serve."""
    import signal

    import uvicorn

    # uvicorn raises the signal again once it has shut down, to the handler found before it:
    # this one, so that the stop ends the command normally
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda number, frame: log.info("stopped by signal %d", number))

    app = edge_app(model, variant, cfg.serve.model_dump())
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=30)
    server = uvicorn.Server(config)
    log.info("serving %s (%s, bundle, edge runtime) at http://%s:%d", model.url, variant, host, port)
    print(json.dumps({"url": f"http://{host}:{port}", "replicas": 1, "variant": variant, "bundle": True,
                      "runtime": "edge"}), flush=True)
    server.run()
