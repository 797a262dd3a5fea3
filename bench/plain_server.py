"""The detection server users write themselves: FastAPI + uvicorn, no queue, no batching.

One request = decode -> preprocess -> one model call for that image -> postprocess ->
JSON, in a plain `def` endpoint (Starlette runs it on its thread pool, so requests overlap
only as threads do). The stages are cvserve's own (`build_task`, then `prepare`,
`run([item])`, `finish`), so bench/compare.py compares the serving around the same
pipeline and nothing else; the answer has the shape of cvserve's /detect (no `timing`).

    python bench/plain_server.py --model-repository models --model demo-detector --port 8001

CVSERVE_* variables (CVSERVE_DEVICE, CVSERVE_INTRA_OP_THREADS ...) apply as in cvserve.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import uvicorn
from fastapi import Body, FastAPI, Query
from fastapi.responses import JSONResponse

from cvserve.app.queue import Job
from cvserve.app.settings import Settings
from cvserve.worker.repository import load_config
from cvserve.worker.server import build_task


def create_app(repository: Path, model: str) -> FastAPI:
    """An app serving `repository/model` on POST /detect (raw image body)."""
    cfg = load_config(repository / model)
    task = build_task(cfg, Settings(model_repository=repository))
    app = FastAPI(title=f"plain server: {cfg.name}")

    @app.post("/detect")
    def detect(data: bytes = Body(..., media_type="image/jpeg"),
               model: str | None = Query(None)) -> JSONResponse:
        if model not in (None, cfg.name):
            return JSONResponse({"detail": f"this server serves '{cfg.name}' only, "
                                           f"not '{model}'"}, status_code=404)
        # No deadline: nothing here checks it (cvserve's batcher would).
        item = task.prepare(Job(model=cfg.name, task=cfg.task, payload=data, deadline_ms=0))
        [output] = task.run([item])
        result, _ = task.finish(item, output)
        return JSONResponse({"model": cfg.name, **result})

    @app.get("/readyz")
    def readyz() -> dict[str, str]:
        return {"status": "ready"}  # the model loaded before the server started

    return app


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-repository", type=Path, required=True,
                   help="folder of model folders")
    p.add_argument("--model", required=True, help="the model folder to serve")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    args = p.parse_args(argv)
    app = create_app(args.model_repository.resolve(), args.model)
    # The asyncio loop and log level that `cvserve run` uses, so only the serving differs.
    uvicorn.run(app, host=args.host, port=args.port, loop="asyncio", log_level="info")


if __name__ == "__main__":
    main()
