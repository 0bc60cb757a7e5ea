"""Trainer configuration: typed dataclasses, presets with the published hyperparameters, and
loading (preset <- YAML file <- --set overrides <- flags) with errors that name the key."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

from advgrpo.common.errors import ConfigError
from advgrpo.common.typed_config import apply_override, deep_merge, from_mapping, load_yaml, to_mapping

LORA_TARGETS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
)


@dataclass
class ModelConfig:
    pretrained: str = "stabilityai/stable-diffusion-3.5-medium"  # id, local path, or "tiny"
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"  # frozen weights; LoRA trains in fp32
    resolution: int = 512
    max_sequence_length: int = 128  # T5 tokens
    seed: int = 0  # initialisation of "tiny" models


@dataclass
class LoraConfig:
    rank: int = 32
    alpha: int = 64
    init: Literal["gaussian", "default"] = "gaussian"
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))


@dataclass
class SamplingConfig:
    num_steps: int = 10
    eval_num_steps: int = 40
    guidance_scale: float = 4.5
    step: Literal["sde", "cps"] = "sde"
    noise_level: float = 0.7  # 'sde': a in std_t = a*sqrt(s/(1-s)); 'cps': a in std = s'*sin(a*pi/2)
    # Fast variant: SDE only in a window of this many steps placed at random in the first half;
    # ODE elsewhere; only window steps are stored and trained. 0: every step is SDE.
    sde_window: int = 0
    group_size: int = 16  # images per prompt (the GRPO group)
    batch_size: int = 16  # images per sampling batch, per process
    batches_per_epoch: int = 4  # sampling batches per process per epoch


@dataclass
class OptimConfig:
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-4
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    clip_range: float = 1e-4  # PPO ratio clip
    adv_clip_max: float = 5.0
    global_std: bool = True  # advantages: per-prompt mean, std over the whole batch
    beta: float = 0.0  # KL to the LoRA-disabled model; 0 skips the reference forward
    train_batch_size: int = 8  # images per gradient micro-batch
    inner_epochs: int = 1
    timestep_fraction: float = 1.0  # share of the stored steps trained (Flow-GRPO: 0.99 / 1.0)
    ema: bool = True
    ema_decay: float = 0.9
    ema_every: int = 8


@dataclass
class RewardConfig:
    server: str = "127.0.0.1:50051"
    token: str | None = None
    weights: dict[str, float] = field(default_factory=lambda: {"dino": 1.0})
    timeout_s: float = 300.0  # deadline of one reward call
    # How long a call keeps retrying while the server is UNAVAILABLE (e.g. restarting: drain plus
    # model reload) before the run fails; a broken ScoreStream is opened again within it too.
    retry_budget_s: float = 60.0
    connect_timeout_s: float = 30.0  # how long start-up waits for the server to be SERVING
    encoding: Literal["raw", "png", "jpeg"] = "raw"
    overlap: bool = True  # stream a group to the server while the next batch samples
    keep_freed_memory: bool = True  # glibc keeps freed buffers: cheaper raw image transfers
    # Image bytes through /dev/shm instead of the socket, for a server on this host that shares
    # /dev/shm with the trainer. "auto": ask the server once (CheckSharedMemory) and fall back to
    # the socket if it cannot read them; true: always (the server must be able to); false: never.
    shared_memory: bool | Literal["auto"] = "auto"


@dataclass
class AdversarialConfig:
    discriminator: str = "dino"  # a trainable model on the reward server; "" disables the loop
    references: Path | None = None  # JSON {prompt: [image paths]} (Adv-GRPO's format)
    schedule: Literal["ratio", "trigger", "off"] = "ratio"
    ratio_k: int = 10  # 'ratio': D trains on k-1 of every k epochs, the generator on the k-th
    steps: int = 1  # optimizer steps per UpdateDiscriminator
    references_per_update: int = 64  # at most this many reference images per update


@dataclass
class DataConfig:
    prompts: Path | None = None  # text file, one prompt per line; default: the references' prompts
    eval_prompts: list[str] = field(default_factory=list)  # default: the first prompts


@dataclass
class RunConfig:
    output_dir: Path = Path("runs/advgrpo")
    epochs: int = 100
    seed: int = 42
    eval_every: int = 10  # epochs; 0: only at the end
    save_every: int = 10  # epochs; 0: only at the end
    eval_images: int = 4
    tensorboard: bool = True  # when tensorboard is installed
    device: str = "auto"


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)


# Published settings: Flow-GRPO (SD3.5-M, 10 steps, CFG 4.5, group 16-24, lr 3e-4, clip 1e-4)
# and Adv-GRPO (DINO ratio 10, PickScore trigger).
_SD35M = {
    "model": {"pretrained": "stabilityai/stable-diffusion-3.5-medium", "dtype": "bfloat16", "resolution": 512},
    "sampling": {
        "num_steps": 10,
        "eval_num_steps": 40,
        "guidance_scale": 4.5,
        "group_size": 16,
        "batch_size": 8,
        "batches_per_epoch": 4,
    },
    "optim": {"lr": 3e-4, "clip_range": 1e-4, "beta": 0.04, "train_batch_size": 8},
}

PRESETS: dict[str, dict[str, Any]] = {
    # Tiny SD3 built in memory on the CPU: minutes, no downloads.
    "tiny": {
        "model": {"pretrained": "tiny", "dtype": "float32", "resolution": 32, "max_sequence_length": 16},
        "lora": {"rank": 4, "alpha": 8},
        "sampling": {
            "num_steps": 4,
            "eval_num_steps": 4,
            "guidance_scale": 4.5,
            "group_size": 4,
            "batch_size": 8,
            "batches_per_epoch": 1,
        },
        "optim": {"lr": 1e-3, "clip_range": 0.2, "train_batch_size": 8, "ema_every": 1},
        "reward": {"weights": {"dino": 1.0}},
        "adversarial": {
            "discriminator": "dino",
            "schedule": "ratio",
            "ratio_k": 2,
            "steps": 2,
            "references_per_update": 16,
        },
        "run": {"epochs": 4, "eval_every": 0, "save_every": 0, "eval_images": 4, "device": "cpu"},
    },
    "sd3.5m-dino": deep_merge(
        _SD35M,
        {
            "reward": {"weights": {"dino": 1.0}},
            "adversarial": {"discriminator": "dino", "schedule": "ratio", "ratio_k": 10},
        },
    ),
    "sd3.5m-pickscore": deep_merge(
        _SD35M,
        {
            "reward": {"weights": {"pickscore": 1.0}},
            "adversarial": {"discriminator": "pickscore", "schedule": "trigger"},
        },
    ),
    "sd3.5m-ocr": deep_merge(
        _SD35M,
        {
            "sampling": {"group_size": 24, "batch_size": 12, "batches_per_epoch": 4},
            "reward": {"weights": {"ocr": 1.0, "dino": 1.0}},
            "adversarial": {"discriminator": "dino", "schedule": "ratio", "ratio_k": 10},
        },
    ),
}


def load_train_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    sets: list[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> TrainConfig:
    data: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"--preset: unknown preset {preset!r} (known: {', '.join(PRESETS)})")
        data = deep_merge(data, PRESETS[preset])
    if config_file is not None:
        data = deep_merge(data, load_yaml(config_file))
    for assignment in sets or []:
        apply_override(data, assignment)
    if overrides:
        data = deep_merge(data, overrides)
    cfg = from_mapping(TrainConfig, data)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    s = cfg.sampling
    if s.group_size < 2:
        raise ConfigError("sampling.group_size: must be at least 2 (advantages compare images of a prompt)")
    if s.batch_size % s.group_size and s.group_size % s.batch_size:
        raise ConfigError(
            f"sampling.batch_size ({s.batch_size}) and sampling.group_size ({s.group_size}): one must divide "
            "the other, so every group is sampled whole"
        )
    if (s.batch_size * s.batches_per_epoch) % s.group_size:
        raise ConfigError(
            f"sampling.group_size ({s.group_size}) must divide the images per epoch "
            f"(batch_size*batches_per_epoch = {s.batch_size * s.batches_per_epoch})"
        )
    if s.num_steps < 1 or s.eval_num_steps < 1:
        raise ConfigError("sampling.num_steps: must be >= 1")
    if s.sde_window < 0 or s.sde_window > s.num_steps:
        raise ConfigError(f"sampling.sde_window: must be in 0..num_steps ({s.num_steps})")
    if cfg.model.resolution % 16:
        raise ConfigError(f"model.resolution: must be a multiple of 16, got {cfg.model.resolution}")
    o = cfg.optim
    if not 0 < o.timestep_fraction <= 1:
        raise ConfigError("optim.timestep_fraction: must be in (0, 1]")
    if o.train_batch_size < 1:
        raise ConfigError("optim.train_batch_size: must be >= 1")
    if not cfg.reward.weights:
        raise ConfigError("reward.weights: at least one model")
    if cfg.reward.retry_budget_s < 0:
        raise ConfigError(f"reward.retry_budget_s: must be >= 0, got {cfg.reward.retry_budget_s}")
    a = cfg.adversarial
    if a.discriminator and a.schedule != "off" and a.references is None:
        raise ConfigError("adversarial.references: required (JSON {prompt: [image paths]}) when a discriminator trains")
    if a.ratio_k < 1:
        raise ConfigError("adversarial.ratio_k: must be >= 1")
    if cfg.data.prompts is None and a.references is None:
        raise ConfigError("data.prompts: required when there is no adversarial.references to take prompts from")


def dump_train_config(cfg: TrainConfig) -> dict[str, Any]:
    return to_mapping(cfg)
