"""The served models: exactly those named when the server starts. A request selects
one by name; nothing in a request can make the server open a path."""

from __future__ import annotations

import time
from dataclasses import dataclass

from serve.engine import Batcher, Engine
from serve.loading import LoadedModel, load_model
from zerolm.errors import UserError


@dataclass
class ServedModel:
    name: str
    engine: Engine
    batcher: Batcher
    created: int

    @property
    def loaded(self) -> LoadedModel:
        return self.engine.m


class Registry:
    def __init__(self):
        self.models: dict[str, ServedModel] = {}

    def add(self, name: str, path: str, *, device: str = "auto", dtype: str = "auto", max_batch: int = 32,
            wait_ms: float = 5.0, on_batch=None) -> ServedModel:
        if name in self.models:
            raise UserError(f"model name {name!r} given twice")
        engine = Engine(load_model(name, path, device=device, dtype=dtype), max_batch=max_batch)
        served = ServedModel(name, engine, Batcher(engine, wait_ms=wait_ms, on_batch=on_batch), int(time.time()))
        self.models[name] = served
        return served

    def get(self, name: str | None) -> ServedModel | None:
        if name is None and len(self.models) == 1:
            return next(iter(self.models.values()))
        return self.models.get(name)


def parse_model_specs(specs: list[str]) -> list[tuple[str, str]]:
    """`NAME=DIR` (or a bare DIR: its folder name) -> [(name, dir)]."""
    out = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            path, name = spec, spec.rstrip("/").split("/")[-1]
            if name == "hf":
                name = spec.rstrip("/").split("/")[-2]
        if not name or not path:
            raise UserError(f"--model expects NAME=DIR, got {spec!r}")
        out.append((name, path))
    return out
