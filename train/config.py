"""Config models of the training stages. `StageConfig` holds what every stage shares
(optimizer, schedule, DeepSpeed, checkpoints, scaling, evaluation cadence); a stage's
own config derives from it and adds its data section and inputs (pretrain below; sft,
reward, dpo, ppo in their modules)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from zerolm.config import StrictModel


class ModelSection(StrictModel):
    preset: str = "tiny"
    # Any ModelConfig field, applied over the preset (vocab_size comes from the data).
    overrides: dict = Field(default_factory=dict)


class BaseDataSection(StrictModel):
    """What the training loop itself reads of a stage's data section."""

    seq_len: int = Field(default=256, ge=8)
    micro_batch_size: int = Field(default=8, ge=1)  # sequences (rows) per worker per micro-step
    grad_accum: int = Field(default=1, ge=1)
    seed: int = 0


class DataSection(BaseDataSection):
    tokens: str = ""  # TOKENS_DIR: the output of `zerolm pack`
    # Mixture stages; None = the manifest's (if any), [] = uniform over all windows.
    mixture: Optional[list[dict]] = None


class OptimSection(StrictModel):
    lr: float = Field(default=1e-3, gt=0)  # peak learning rate
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)  # final lr = ratio x peak (seed: 0.1)
    weight_decay: float = Field(default=0.1, ge=0)  # only on >= 2-D parameters
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = Field(default=1.0, ge=0)  # 0 = off
    # Peak lrs of the token tables (None = lr), under the same schedule. Each row of
    # an embedding is updated only in the steps whose batch holds its token, so at
    # the matrices' lr a small model's tables learn even bigram statistics slowly; a
    # much larger lr for the input table and a larger one for the output projection
    # (as nanochat does), neither decayed, is what let the demo's 5M model beat a Kneser-Ney 3-gram in
    # its time budget (docs/benchmarks.md). A tied table takes lm_head_lr.
    embedding_lr: Optional[float] = Field(default=None, gt=0)
    lm_head_lr: Optional[float] = Field(default=None, gt=0)


class ScheduleSection(StrictModel):
    # cosine: linear warmup then cosine to min_lr. wsd: warmup, stable at peak, then a
    # final decay (MiniCPM's warmup-stable-decay). constant: warmup then flat.
    kind: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_frac: float = Field(default=0.05, ge=0, lt=1)  # the seed: 5-10% of training
    decay_frac: float = Field(default=0.2, gt=0, le=1)  # wsd: share of steps spent decaying
    decay_shape: Literal["cosine", "linear", "sqrt"] = "sqrt"  # wsd decay curve


def cpu_has_bf16() -> bool:
    """Whether this machine's CPU multiplies bf16 natively (x86 AVX512-BF16 or AMX,
    Arm's BF16 extension), read from /proc/cpuinfo; False where that file is absent."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line.split(":", 1)[1].split() for line in f
                          if line.startswith(("flags", "Features"))), [])
    except OSError:
        return False
    return bool({"avx512_bf16", "amx_bf16", "bf16"} & set(flags))


class DeepSpeedSection(StrictModel):
    # None = 0 for one worker (nothing to partition; the fastest step), 2 for several.
    zero_stage: Optional[int] = Field(default=None, ge=0, le=3)
    # bf16 / fp16: half-precision parameters, fp32 master weights in the optimizer
    # (DeepSpeed's mixed precision; halves ZeRO's communication). amp_bf16: fp32
    # parameters with torch.autocast to bf16 (DeepSpeed's torch_autocast): no
    # master-weight copies, the fastest choice on one GPU. fp32: CPU, tests.
    # auto = amp_bf16 on GPU and on CPUs with bf16 instructions (measured 1.5x the fp32
    # step of the demo's model on a Zen 4 core), else fp32 (CPUs without bf16 units
    # are slower in bf16).
    precision: Literal["auto", "bf16", "fp16", "amp_bf16", "fp32"] = "auto"

    def resolved_zero_stage(self, world_size: int) -> int:
        return self.zero_stage if self.zero_stage is not None else (0 if world_size == 1 else 2)

    def resolved_precision(self, use_gpu: bool) -> str:
        if self.precision != "auto":
            return self.precision
        return "amp_bf16" if use_gpu or cpu_has_bf16() else "fp32"
    offload_optimizer: bool = False  # ZeRO-Offload: optimizer states on CPU
    offload_params: bool = False  # ZeRO-3 only
    # fp16 dynamic loss scaling
    initial_scale_power: int = 16
    loss_scale_window: int = 1000
    extra: dict = Field(default_factory=dict)  # merged into the DeepSpeed config as is


class EvalSection(StrictModel):
    every: int = Field(default=100, ge=0)  # steps; 0 = only at the end
    at_start: bool = False  # also evaluate the initial weights (logged as step 0): a "before" figure


class PretrainEvalSection(EvalSection):
    max_windows: int = Field(default=64, ge=1)  # per source of the val split


class CheckpointSection(StrictModel):
    every: int = Field(default=200, ge=0)  # steps; 0 = only at the end
    keep_last: int = Field(default=2, ge=1)


class ScalingSection(StrictModel):
    launcher: Literal["ray", "local"] = "ray"  # local: this process (or torchrun), no Ray
    address: Optional[str] = None
    num_workers: int = Field(default=1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(default=1, gt=0)
    max_failures: int = Field(default=0, ge=0)  # Ray Train restarts; the loop resumes


class StageConfig(StrictModel):
    """Every training stage's config derives from this; the stage adds `data` (a
    BaseDataSection) and its own inputs."""

    output: str = ""  # RUN_DIR
    data: BaseDataSection = Field(default_factory=BaseDataSection)
    optim: OptimSection = Field(default_factory=OptimSection)
    schedule: ScheduleSection = Field(default_factory=ScheduleSection)
    deepspeed: DeepSpeedSection = Field(default_factory=DeepSpeedSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    max_steps: Optional[int] = Field(default=None, ge=1)
    log_every: int = Field(default=10, ge=1)
    activation_checkpointing: bool = False
    compile: bool = False
    # Peak dense TFLOP/s of one device for MFU; None = known GPUs by name, else no MFU.
    peak_tflops: Optional[float] = None
    threads_per_worker: Optional[int] = Field(default=None, ge=1)  # torch CPU threads
    export_hf: bool = True


class PretrainConfig(StageConfig):
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    eval: PretrainEvalSection = Field(default_factory=PretrainEvalSection)
    # Length of training: steps, or tokens (converted to steps); one is required.
    max_tokens: Optional[int] = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _length(self):
        if self.max_steps is None and self.max_tokens is None:
            raise ValueError("set max_steps or max_tokens")
        return self

    def tokens_per_step(self, world_size: int) -> int:
        return self.data.seq_len * self.data.micro_batch_size * self.data.grad_accum * world_size

    def total_steps(self, world_size: int) -> int:
        if self.max_steps is not None:
            return self.max_steps
        return max(1, -(-self.max_tokens // self.tokens_per_step(world_size)))
