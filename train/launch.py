"""Starting training workers: Ray Train's TorchTrainer (local Ray or a cluster, CPU or
GPU workers, restarts on failure), or this very process (scaling.launcher: local;
under torchrun each process is one rank). Either way every rank runs the stage
runner's `worker` (train/runner.py), which rebuilds the stage's config from a plain
dict, so nothing but JSON crosses process borders.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

from train.config import StageConfig


def _ray_entry(payload: dict) -> None:
    """Runs inside each Ray Train worker."""
    if not payload["use_gpu"]:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from train.runner import worker

    worker(payload)


def launch(cfg: StageConfig, job: dict, *, echo=print) -> None:
    """job: {"stage": name, "total_steps": n}, sent to every rank with the config."""
    from train.runner import worker

    task = job["stage"]
    payload = {**job, "config": cfg.model_dump(mode="json"), "use_gpu": cfg.scaling.use_gpu}
    if cfg.scaling.launcher == "local":
        worker(payload, echo=echo)
        return
    from ray.train import FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from zerolm.ray_env import ensure_ray, verbose

    ensure_ray(cfg.scaling.address)
    s = cfg.scaling
    resources = {"CPU": s.cpus_per_worker}
    if s.use_gpu:
        resources["GPU"] = 1
    env = {"DS_ACCELERATOR": "cpu"} if not s.use_gpu else {}
    # Ray Train's print patch tees every worker print into its logger as well as stdout,
    # so each progress line reached the driver twice.
    env["RAY_TRAIN_ENABLE_PRINT_PATCH"] = "0"
    env.update({k: v for k, v in os.environ.items() if k.startswith("ZEROLM_CRASH_")})  # the loop's test hook
    trainer = TorchTrainer(
        _ray_entry, train_loop_config=payload,
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=f"zerolm-{task}", storage_path=str((Path(cfg.output) / "ray").resolve()),
                             failure_config=FailureConfig(max_failures=s.max_failures),
                             worker_runtime_env={"env_vars": env},
                             # the controller's INFO lines ("Requesting resources ...") reach the
                             # driver through log_to_driver, which our progress lines need
                             logging_config=LoggingConfig(log_level="INFO" if verbose() else "WARNING")),
    )
    # Ray Train's fit() installs a SIGINT handler that aborts its run controller and
    # leaves it installed: a later Ctrl-C in this process (`zerolm demo` serves after
    # training) then called the dead controller, printed a traceback and started a new
    # local Ray instance on the way out. Put the caller's handler back.
    previous = signal.getsignal(signal.SIGINT)
    try:
        trainer.fit()
    finally:
        if threading.current_thread() is threading.main_thread() and previous is not None:
            signal.signal(signal.SIGINT, previous)
