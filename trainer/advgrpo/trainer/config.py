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
    pretrained: str = "stabilityai/stable-diffusion-3.5-medium"  # id, local path, "toy" or "tiny"
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"  # frozen weights; LoRA trains in fp32
    resolution: int = 512
    max_sequence_length: int = 128  # T5 tokens
    seed: int = 0  # initialisation of "tiny" models
    # The VAE decodes in fp32, as both originals do (bf16 decoding leaves artifacts the
    # discriminator can learn to spot instead of image quality). "bfloat16" where memory forces it.
    vae_dtype: Literal["float32", "bfloat16", "float16"] = "float32"


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
    # Fast variant: SDE only in a window of this many consecutive steps (the original's
    # train_num_steps); ODE elsewhere; only window steps are stored and trained. 0: every step.
    sde_window: int = 0
    # Where the window starts: a fixed step (Adv-GRPO: random_timestep = 0), or, when null, a step
    # drawn per epoch from sde_window_range (both ends included; null: 0..num_steps//2, Flow-GRPO-Fast).
    sde_window_start: int | None = None
    sde_window_range: tuple[int, int] | None = None
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
    train_batch_size: int = 8  # images per gradient micro-batch (per process)
    # Gradient accumulation in the originals' unit: optimizer steps per epoch (per inner epoch).
    # Each step accumulates an equal share of the epoch's micro-batches; Flow-GRPO and Adv-GRPO
    # set gradient_accumulation_steps = num_batches_per_epoch // 2, i.e. 2 steps per epoch.
    steps_per_epoch: int = 2
    inner_epochs: int = 1
    # Flow-GRPO trains the first int(num_steps * timestep_fraction) steps of the trajectory (0.99
    # with 10 steps: never the last, where sigma' = 0); only window steps in that prefix train.
    timestep_fraction: float = 1.0
    ema: bool = True
    ema_decay: float = 0.9
    ema_every: int = 8


@dataclass
class RewardConfig:
    server: str = "127.0.0.1:50051"
    token: str | None = None
    # TLS to the reward server (its --tls-cert): tls on, the CA bundle to check it against (else
    # the system's), and this trainer's certificate and key where the server requires one (mTLS).
    tls: bool = False
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_server_name: str | None = None  # the name to check the server's certificate against
    weights: dict[str, float] = field(default_factory=lambda: {"dino": 1.0})
    timeout_s: float = 300.0  # deadline of one reward call
    # How long a call keeps retrying while the server is UNAVAILABLE (e.g. restarting: drain plus
    # model reload) before the run fails; a broken ScoreStream is opened again within it too.
    retry_budget_s: float = 60.0
    connect_timeout_s: float = 30.0  # how long start-up waits for the server to be SERVING
    # Largest gRPC message either way: keep it equal to the server's server.max_message_bytes.
    max_message_bytes: int = 64 * 1024 * 1024
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
    steps: int = 1  # optimizer steps per UpdateDiscriminator (the original: 1 per D epoch)
    # Reference images per update; 0: as many as the update's generated images (every rank's),
    # as the original, which loads each sampled prompt's references and truncates to that count.
    references_per_update: int = 0


@dataclass
class DataConfig:
    prompts: Path | None = None  # text file, one prompt per line; default: the references' prompts
    eval_prompts: list[str] = field(default_factory=list)  # default: the first prompts
    # References of the eval prompts for the DINO-similarity metric (the same JSON format);
    # default: adversarial.references. Adv-GRPO evaluates against held-out test references.
    eval_references: Path | None = None


@dataclass
class RunConfig:
    output_dir: Path = Path("runs/advgrpo")
    epochs: int = 100
    seed: int = 42
    eval_every: int = 10  # epochs; 0: only at the end
    save_every: int = 10  # epochs; 0: only at the end
    eval_images: int = 4
    # Evaluation also reports this reward-server model's score (Adv-GRPO's DINO similarity to the
    # eval prompts' references) when the server hosts it and references exist; "" turns it off.
    eval_similarity: str = "dino_similarity"
    # The reward spec evaluations report (eval_reward_mean and per model); {}: reward.weights.
    # Adv-GRPO evaluates PickScore (eval_reward_fn = {"pickscore": 1, "image_similarity": 1}).
    eval_weights: dict[str, float] = field(default_factory=dict)
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


# Presets that reproduce the published configurations. Values are per process, for the GPU count
# the original config was written for (its gpu_number); docs/METHOD.md lists every value with the
# file it comes from. The originals' epoch is "48 prompt groups": with other process counts, scale
# sampling.batches_per_epoch to keep it.
_SD35M = {
    "model": {"pretrained": "stabilityai/stable-diffusion-3.5-medium", "dtype": "bfloat16", "resolution": 512},
    "lora": {"rank": 32, "alpha": 64, "init": "gaussian"},
    "sampling": {"num_steps": 10, "eval_num_steps": 40, "guidance_scale": 4.5},
    "optim": {
        "lr": 3e-4,
        "betas": (0.9, 0.999),
        "weight_decay": 1e-4,
        "eps": 1e-8,
        "max_grad_norm": 1.0,
        "adv_clip_max": 5.0,
        "global_std": True,
        "inner_epochs": 1,
        "steps_per_epoch": 2,
        "timestep_fraction": 0.99,
        "ema": True,
        "ema_decay": 0.9,
        "ema_every": 8,
    },
    "run": {"seed": 42, "eval_every": 60, "save_every": 60},
}

# showlab/Adv-GRPO config/grpo.py, gpu_number = 8: the Fast CPS sampler (a = 0.8) with a 2-step SDE
# window fixed at step 0; 1 prompt x 8 images per sampling batch, 16 images per prompt,
# 12 batches per epoch (= int(48 / (8 * 8 / 16))); clip 1e-5, no KL.
_ADV_GRPO = deep_merge(
    _SD35M,
    {
        "sampling": {
            "step": "cps",
            "noise_level": 0.8,
            "sde_window": 2,
            "sde_window_start": 0,
            "group_size": 16,
            "batch_size": 8,
            "batches_per_epoch": 12,
        },
        "optim": {"clip_range": 1e-5, "beta": 0.0, "train_batch_size": 8},
        "adversarial": {"steps": 1, "references_per_update": 0},
        "run": {"eval_weights": {"pickscore": 1.0}},
    },
)

# yifan123/flow_grpo config/grpo.py, gpu_number = 32: the full SDE sampler (a = 0.7, every step
# stochastic), 24 images per prompt, 9 per sampling batch, 4 batches per epoch
# (= int(48 / (32 * 9 / 24))); clip 1e-4 (config/base.py), a KL to the base model.
_FLOW_GRPO = deep_merge(
    _SD35M,
    {
        "sampling": {
            "step": "sde",
            "noise_level": 0.7,
            "sde_window": 0,
            "group_size": 24,
            "batch_size": 9,
            "batches_per_epoch": 4,
        },
        "optim": {"clip_range": 1e-4, "train_batch_size": 9},
        "adversarial": {"discriminator": "", "schedule": "off"},
    },
)

PRESETS: dict[str, dict[str, Any]] = {
    # The shipped pretrained toy SD3 (advgrpo.trainer.toy_model) on the CPU: seconds per epoch, no
    # downloads. Adv-GRPO's sampler (CPS, a = 0.8, a 2-step window at step 0) on 4 steps; a larger
    # clip range and learning rate, so that a few epochs of 8 images move the LoRA. The toy preset
    # below is the same recipe at the toy world's scale.
    "tiny": {
        "model": {"pretrained": "toy", "dtype": "float32", "resolution": 32, "max_sequence_length": 24},
        "lora": {"rank": 4, "alpha": 8},
        "sampling": {
            "num_steps": 4,
            "eval_num_steps": 4,
            "guidance_scale": 4.5,
            "step": "cps",
            "noise_level": 0.8,
            "sde_window": 2,
            "sde_window_start": 0,
            "group_size": 4,
            "batch_size": 8,
            "batches_per_epoch": 1,
        },
        "optim": {
            "lr": 1e-3,
            "clip_range": 0.2,
            "train_batch_size": 8,
            "steps_per_epoch": 1,
            "timestep_fraction": 0.99,
            "ema_every": 1,
        },
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
    # Adv-GRPO with the DINOv2 reward (dino_cotrain_sd3_patch_fast, train_sd3_fast_dino_patch.py):
    # D trains on 9 of every 10 epochs (d_times = 10), the generator on the 10th. D's learning
    # rate (d_lr = 1e-4) is the reward server's (sd3-adv preset, models.dino.params.lr).
    "dino_cotrain_sd3_patch_fast": deep_merge(
        _ADV_GRPO,
        {
            "reward": {"weights": {"dino": 1.0}},
            "adversarial": {"discriminator": "dino", "schedule": "ratio", "ratio_k": 10},
        },
    ),
    # Adv-GRPO with PickScore as the discriminator (pickscore_cotrain_sd3_fast,
    # train_sd3_fast_pickscore.py): D trains instead of G when the generations' mean PickScore is
    # above the references'. The config's d_times = 20 is kept as ratio_k, but that script never
    # reads it (its ratio test is commented out). d_lr = 5e-6 and the last vision block trainable
    # (tune_layer = -1) are the server's (models.pickscore.params.lr, trainable_blocks).
    "pickscore_cotrain_sd3_fast": deep_merge(
        _ADV_GRPO,
        {
            "reward": {"weights": {"pickscore": 1.0}},
            "adversarial": {"discriminator": "pickscore", "schedule": "trigger", "ratio_k": 20},
        },
    ),
    # Adv-GRPO's OCR experiment. The released code has no config for it; the paper describes
    # lambda*OCR + (1-lambda)*a CLIP similarity reward with the discriminator. Ours: PickScore (a
    # CLIP similarity) as the discriminator, trained as in pickscore_cotrain_sd3_fast, with
    # lambda = 0.5 (the released OCR mix, pickscore_sd3_fast: pickscore 0.5 + ocr 0.5). Both terms
    # lie in about [0, 1] (PickScore/26, OCR accuracy), so lambda weighs them as written.
    "ocr_cotrain_sd3_fast": deep_merge(
        _ADV_GRPO,
        {
            "reward": {"weights": {"ocr": 0.5, "pickscore": 0.5}},
            "adversarial": {"discriminator": "pickscore", "schedule": "trigger", "ratio_k": 20},
        },
    ),
    # The baselines the paper compares against: Flow-GRPO with a fixed reward.
    "flow_grpo_pickscore_sd3": deep_merge(
        _FLOW_GRPO, {"optim": {"beta": 0.01}, "reward": {"weights": {"pickscore": 1.0}}}
    ),
    "flow_grpo_general_ocr_sd3": deep_merge(_FLOW_GRPO, {"optim": {"beta": 0.04}, "reward": {"weights": {"ocr": 1.0}}}),
}

# The toy world's recipe (docs/EXPERIMENTS.md): Adv-GRPO's sampler and update (CPS a = 0.8, a
# 2-step SDE window at step 0, timestep fraction 0.99, no KL) on the shipped pretrained toy model,
# a small SD3 that draws the toy domain of advgrpo.common.toy_domain from its captions. Scaled to
# two CPU cores: 8 steps, 4 prompts x 8 images per epoch, one optimizer step per epoch, D every
# other epoch with 4 optimizer steps per update (docs/METHOD.md gives each value's reason).
PRESETS["toy"] = deep_merge(
    PRESETS["tiny"],
    {
        "sampling": {"num_steps": 8, "eval_num_steps": 8, "group_size": 8, "batch_size": 16, "batches_per_epoch": 2},
        "optim": {"train_batch_size": 16},
        "adversarial": {"steps": 4, "references_per_update": 32},
    },
)

# Names of earlier releases, kept so that existing launch scripts still run the method they named.
PRESET_ALIASES = {
    "sd3.5m-dino": "dino_cotrain_sd3_patch_fast",
    "sd3.5m-pickscore": "pickscore_cotrain_sd3_fast",
    "sd3.5m-ocr": "ocr_cotrain_sd3_fast",
}


def preset_names() -> list[str]:
    return [*PRESETS, *PRESET_ALIASES]


# Reward specs: a file's or caller's ``reward.weights`` is the whole spec, never added to the
# preset's (``--set reward.weights.ocr=0.5`` adds one model to it).
WHOLE_MAPPINGS = ("weights", "eval_weights")


def load_train_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    sets: list[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> TrainConfig:
    data: dict[str, Any] = {}
    if preset is not None:
        preset = PRESET_ALIASES.get(preset, preset)
        if preset not in PRESETS:
            raise ConfigError(f"--preset: unknown preset {preset!r} (known: {', '.join(preset_names())})")
        data = deep_merge(data, PRESETS[preset])
    if config_file is not None:
        data = deep_merge(data, load_yaml(config_file), whole=WHOLE_MAPPINGS)
    for assignment in sets or []:
        apply_override(data, assignment)
    if overrides:
        data = deep_merge(data, overrides, whole=WHOLE_MAPPINGS)
    cfg = from_mapping(TrainConfig, data)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """What a config must satisfy to mean anything; checked on load, so ``--print-config`` shows
    only configs that would run. What training needs besides (references, prompts, the process
    count) is checked when training starts: ``validate_for_training``."""
    r = cfg.reward
    if (r.tls_cert is None) != (r.tls_key is None):
        raise ConfigError("reward.tls_cert, reward.tls_key: give both (this trainer's certificate and key) or neither")
    s = cfg.sampling
    if s.group_size < 2:
        raise ConfigError("sampling.group_size: must be at least 2 (advantages compare images of a prompt)")
    if s.batch_size < 1 or s.batches_per_epoch < 1:
        raise ConfigError("sampling.batch_size and sampling.batches_per_epoch: must be >= 1")
    if s.num_steps < 1 or s.eval_num_steps < 1:
        raise ConfigError("sampling.num_steps: must be >= 1")
    if not s.noise_level > 0:
        raise ConfigError(f"sampling.noise_level: must be > 0 (0 makes every step deterministic), got {s.noise_level}")
    if s.sde_window < 0 or s.sde_window > s.num_steps:
        raise ConfigError(f"sampling.sde_window: must be in 0..num_steps ({s.num_steps})")
    if s.sde_window_start is not None and s.sde_window_range is not None:
        raise ConfigError(
            "sampling.sde_window_range: set together with sampling.sde_window_start, which fixes the window; "
            "set sampling.sde_window_start=null to draw the start from the range"
        )
    if s.sde_window_start is not None and not 0 <= s.sde_window_start < s.num_steps:
        raise ConfigError(f"sampling.sde_window_start: must be in 0..{s.num_steps - 1} (num_steps - 1)")
    if s.sde_window_range is not None and not 0 <= s.sde_window_range[0] <= s.sde_window_range[1] < s.num_steps:
        raise ConfigError(
            f"sampling.sde_window_range: expected [lo, hi] with 0 <= lo <= hi < num_steps ({s.num_steps}), "
            f"got {list(s.sde_window_range)}"
        )
    if cfg.model.resolution % 16:
        raise ConfigError(f"model.resolution: must be a multiple of 16, got {cfg.model.resolution}")
    o = cfg.optim
    if not 0 < o.timestep_fraction <= 1:
        raise ConfigError("optim.timestep_fraction: must be in (0, 1]")
    _check_trained_steps(cfg)
    if o.train_batch_size < 1:
        raise ConfigError("optim.train_batch_size: must be >= 1")
    if o.steps_per_epoch < 1:
        raise ConfigError("optim.steps_per_epoch: must be >= 1")
    images = s.batch_size * s.batches_per_epoch
    if images % o.train_batch_size:
        raise ConfigError(
            f"optim.train_batch_size ({o.train_batch_size}) must divide the images per epoch and process "
            f"(sampling.batch_size * sampling.batches_per_epoch = {images}): micro-batches are equal"
        )
    micro = images // o.train_batch_size
    if micro % o.steps_per_epoch:
        raise ConfigError(
            f"optim.steps_per_epoch ({o.steps_per_epoch}) must divide the micro-batches per epoch ({micro} = "
            f"{images} images / optim.train_batch_size {o.train_batch_size}): every step accumulates an equal share"
        )
    if not cfg.reward.weights:
        raise ConfigError("reward.weights: at least one model")
    if not 1024 <= cfg.reward.max_message_bytes <= (1 << 31) - 1:
        raise ConfigError(f"reward.max_message_bytes: must be in 1024..{(1 << 31) - 1} (gRPC's limit)")
    if cfg.reward.retry_budget_s < 0:
        raise ConfigError(f"reward.retry_budget_s: must be >= 0, got {cfg.reward.retry_budget_s}")
    a = cfg.adversarial
    if a.ratio_k < 1:
        raise ConfigError("adversarial.ratio_k: must be >= 1")
    if a.references_per_update < 0:
        raise ConfigError("adversarial.references_per_update: must be >= 0 (0: as many as generated images)")


def _possible_windows(cfg: TrainConfig) -> list[range]:
    from advgrpo.trainer.sde import sde_window  # torch: only when a config is checked

    s = cfg.sampling
    if s.sde_window_start is not None:
        starts = [s.sde_window_start]
    else:
        lo, hi = s.sde_window_range if s.sde_window_range is not None else (0, s.num_steps // 2)
        starts = list(range(lo, hi + 1))
    return [sde_window(s.num_steps, s.sde_window or s.num_steps, start=start) for start in starts]


def trained_step_counts(cfg: TrainConfig) -> set[int]:
    """How many steps per image an epoch's update can train, over every window the sampler can draw."""
    from advgrpo.trainer.sde import trained_steps

    return {len(trained_steps(w, cfg.sampling.num_steps, cfg.optim.timestep_fraction)) for w in _possible_windows(cfg)}


def backward_passes_per_step(cfg: TrainConfig) -> int | None:
    """Backward passes accumulated into one optimizer step (micro-batches per step x trained steps),
    or None when it varies between epochs (a drawn window that can reach past the trained prefix)."""
    s, o = cfg.sampling, cfg.optim
    micro = s.batch_size * s.batches_per_epoch // o.train_batch_size // o.steps_per_epoch
    counts = trained_step_counts(cfg)
    return micro * counts.pop() if len(counts) == 1 else None


def _check_trained_steps(cfg: TrainConfig) -> None:
    """Every window the sampler can draw must train at least one step, and none that is
    deterministic: 'cps' at the last step has std = sigma' * sin(a*pi/2) = 0 (sigma' = 0)."""
    from advgrpo.trainer.sde import trained_steps

    s, o = cfg.sampling, cfg.optim
    for window in _possible_windows(cfg):
        steps = [window[k] for k in trained_steps(window, s.num_steps, o.timestep_fraction)]
        if not steps:
            raise ConfigError(
                f"optim.timestep_fraction: the SDE window {list(window)} has no step among the first "
                f"int(num_steps * timestep_fraction) = {int(s.num_steps * o.timestep_fraction)} steps: nothing would train"
            )
        if s.step == "cps" and s.num_steps - 1 in steps:
            raise ConfigError(
                f"optim.timestep_fraction: with sampling.step=cps the last step ({s.num_steps - 1}, sigma' = 0) is "
                "deterministic (std 0) and cannot be trained; set optim.timestep_fraction below 1 (Flow-GRPO: 0.99 "
                "skips it) or keep the SDE window off the last step"
            )


def validate_for_training(cfg: TrainConfig, world_size: int = 1) -> None:
    """What a training run needs on top of ``validate``: data, and groups that fill the epoch."""
    a, s = cfg.adversarial, cfg.sampling
    if a.discriminator and a.schedule != "off" and a.references is None:
        raise ConfigError("adversarial.references: required (JSON {prompt: [image paths]}) when a discriminator trains")
    if cfg.data.prompts is None and a.references is None:
        raise ConfigError("data.prompts: required when there is no adversarial.references to take prompts from")
    total = s.batch_size * s.batches_per_epoch * world_size
    if total % s.group_size:
        raise ConfigError(
            f"sampling.group_size ({s.group_size}) must divide the images per epoch over all {world_size} "
            f"process(es) (sampling.batch_size * sampling.batches_per_epoch * processes = {total})"
        )


def dump_train_config(cfg: TrainConfig) -> dict[str, Any]:
    return to_mapping(cfg)


def without_secrets(config: dict[str, Any]) -> dict[str, Any]:
    """The config as a checkpoint records it and ``--print-config`` shows it: the reward server's
    token left out."""
    reward = dict(config.get("reward", {}))
    if reward.get("token"):
        reward["token"] = "<redacted>"
    return {**config, "reward": reward}
