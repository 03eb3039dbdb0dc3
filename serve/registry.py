"""The served models: exactly those named when the server starts. A request selects
one by name; nothing in a request can make the server open a path."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from serve.batching import Batcher
from serve.engine import Engine, TextCodec
from serve.loading import LoadedModel, load_model
from train.reward_model import is_reward_model
from train.weights import find_model_dir
from zerolm.errors import UserError

if TYPE_CHECKING:
    from serve.engine_process import EngineClient
    from train.reward_model import RewardScorer


@dataclass
class ServedModel:
    name: str
    codec: TextCodec  # tokenizer, chat metadata, context window
    batcher: "Batcher | EngineClient | None"  # submit(Request) -> Future; None for a reward model
    created: int
    scorer: "RewardScorer | None" = None  # a reward model: scores conversations, generates nothing

    @property
    def loaded(self) -> LoadedModel:
        return self.codec.m

    @property
    def alive(self) -> bool:
        return getattr(self.batcher, "alive", True)


class Registry:
    def __init__(self):
        self.models: dict[str, ServedModel] = {}

    def add(self, name: str, path: str, *, device: str = "auto", dtype: str = "auto", max_batch: int = 32,
            wait_ms: float = 5.0, on_batch=None, engine_process: bool = True,
            cuda_graphs: bool | None = None) -> ServedModel:
        """engine_process: run the model in its own process (the server's default, see
        serve/engine_process.py); False runs it on a thread of this one. cuda_graphs:
        None = on when the model is on a GPU (serve/decoder.py)."""
        if name in self.models:
            raise UserError(f"model name {name!r} given twice")
        if is_reward_model(find_model_dir(path)):
            return self._add_reward_model(name, path, device=device)
        if engine_process:
            from serve.engine_process import EngineClient

            loaded = load_model(name, path, device=device, dtype=dtype, weights=False)  # bad folders fail here
            batcher = EngineClient(name, str(loaded.path), device=device, dtype=dtype, max_batch=max_batch,
                                   wait_ms=wait_ms, on_batch=on_batch, cuda_graphs=cuda_graphs)
            loaded.device, loaded.dtype = torch.device(batcher.device), getattr(torch, batcher.dtype)
            codec = TextCodec(loaded, max_batch=max_batch)
        else:
            engine = Engine(load_model(name, path, device=device, dtype=dtype), max_batch=max_batch,
                            cuda_graphs=cuda_graphs)
            codec, batcher = engine, Batcher(engine, wait_ms=wait_ms, on_batch=on_batch)
        served = ServedModel(name, codec, batcher, int(time.time()))
        self.models[name] = served
        return served

    def _add_reward_model(self, name: str, path: str, *, device: str) -> ServedModel:
        """Scored in the HTTP process (one forward per request, no decode loop to keep
        busy), by the same scorer that filters preference pairs."""
        from train.reward_model import RewardScorer

        loaded = load_model(name, path, weights=False)
        dev = "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
        served = ServedModel(name, TextCodec(loaded), None, int(time.time()),
                             scorer=RewardScorer(loaded.path, device=dev))
        self.models[name] = served
        return served

    def close(self) -> None:
        for served in self.models.values():
            close = getattr(served.batcher, "close", None) if served.batcher is not None else None
            if close:
                close()

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
