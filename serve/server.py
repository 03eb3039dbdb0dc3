"""`zerolm serve`: load the named models, then serve the HTTP API with uvicorn."""

from __future__ import annotations

from serve.app import Metrics, create_app
from serve.registry import Registry, parse_model_specs
from zerolm.errors import UserError


def build_app(model_specs: list[str], *, api_key: str | None = None, device: str = "auto", dtype: str = "auto",
              max_batch: int = 32, wait_ms: float = 5.0, max_body_bytes: int = 8 << 20,
              engine_process: bool = True, cuda_graphs: bool | None = None, eval_sets: list[str] | None = None):
    if not model_specs:
        raise UserError("no model to serve: give --model NAME=DIR (a run folder or its hf/ export)")
    from serve.eval.api import parse_eval_sets

    sets = parse_eval_sets(eval_sets or [])  # checked before any model loads
    metrics = Metrics()
    registry = Registry()
    try:
        for name, path in parse_model_specs(model_specs):
            registry.add(name, path, device=device, dtype=dtype, max_batch=max_batch, wait_ms=wait_ms,
                         on_batch=metrics.observe_step, engine_process=engine_process,
                         cuda_graphs=cuda_graphs)
    except BaseException:
        registry.close()  # engines already started for earlier models
        raise
    return create_app(registry, api_key=api_key, max_body_bytes=max_body_bytes, metrics=metrics, eval_sets=sets)


def serve(model_specs: list[str], *, host: str = "127.0.0.1", port: int = 8000, **kwargs) -> None:
    import uvicorn

    app = build_app(model_specs, **kwargs)
    names = ", ".join(sorted(app.state.registry.models))
    print(f"serving {names} at http://{host}:{port}  (OpenAI API under /v1; /health, /metrics)", flush=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        app.state.registry.close()
