"""The Adv-GRPO training loop. It only wires the pieces: sampling (``sampling``/``sde``), rewards
from the server (``rewards``), advantages and the clipped loss (``grpo``), the discriminator
schedule (``schedule``), EMA, checkpoints and logs.

Per epoch: sample groups (each image's trajectory and log-probs stored), stream every group to the
reward server as soon as it is decoded, score a batch of references with the discriminator, then
- train the discriminator (UpdateDiscriminator with the epoch's references and generations) when
  the schedule says so, and/or
- take GRPO steps on the generator's LoRA.
Every random choice is drawn from generators seeded by (seed, epoch, rank), so a resumed run
replays exactly what an unbroken run would have done.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from advgrpo.client import Group, RetryPolicy, RewardClient
from advgrpo.common.errors import ConfigError
from advgrpo.trainer import healthcheck
from advgrpo.trainer.checkpoint import TrainerState, checkpoint_dir, latest_checkpoint, load_checkpoint, save_checkpoint
from advgrpo.trainer.config import (
    TrainConfig,
    backward_passes_per_step,
    dump_train_config,
    validate_for_training,
    without_secrets,
)
from advgrpo.trainer.ema import EMA
from advgrpo.trainer.grpo import group_advantages, grpo_loss
from advgrpo.trainer.logs import JsonlWriter, MetricsWriter, save_grid
from advgrpo.trainer.references import (
    ReferenceSet,
    check_coverage,
    load_prompts,
    load_reference_image,
    load_reference_set,
)
from advgrpo.trainer.rewards import RewardStream, VersionFloor, score_epoch, zero_variance_share
from advgrpo.trainer.sampling import Conditioning, Trajectory, sample_with_logprobs, step_log_prob
from advgrpo.trainer.schedule import DiscriminatorSchedule
from advgrpo.trainer.sde import check_trainable_steps, kl_to_reference, sde_window, trained_steps

from . import pipeline as sd3

log = logging.getLogger(__name__)


def derived_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts (seed, epoch, rank, purpose): independent streams, no state."""
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


def to_uint8(images: torch.Tensor) -> list[np.ndarray]:
    """Float [B, 3, H, W] in [0, 1] -> uint8 HWC arrays (what goes on the wire)."""
    arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [np.ascontiguousarray(a) for a in arr]


@dataclass
class EpochSamples:
    prompt_ids: torch.Tensor  # [N] index into the trainer's prompt list
    trajectories: list[Trajectory]
    images: list[np.ndarray]  # uint8, N
    rewards: torch.Tensor | None = None  # [N]


class AdvGrpoTrainer:
    def __init__(self, cfg: TrainConfig, *, resume: str | Path | None = None):
        self.cfg = cfg
        self.out = Path(cfg.run.output_dir)
        # The accumulation count is fixed here for DeepSpeed, whose engine takes it at prepare time
        # (accelerate fills deepspeed_config.gradient_accumulation_steps from it); DDP and a single
        # process get it per update (accumulate_gradients).
        passes = backward_passes_per_step(cfg)
        self.accelerator = Accelerator(cpu=cfg.run.device == "cpu", gradient_accumulation_steps=passes or 1)
        if self.accelerator.distributed_type == DistributedType.DEEPSPEED and passes is None:
            raise ConfigError(
                "sampling.sde_window_range: under DeepSpeed the number of trained steps must be the same every "
                "epoch (its engine fixes the accumulation count); fix the window (sampling.sde_window_start)"
            )
        self.device = self.accelerator.device
        self.rank = self.accelerator.process_index
        self.world = self.accelerator.num_processes
        self.is_main = self.accelerator.is_main_process
        self.state = TrainerState(epoch=0, global_step=0)
        validate_for_training(cfg, self.world)
        try:
            self._setup(resume)
        except BaseException:
            # A refused start must not leave the client's channel and shared-memory segments, or
            # the log files, open in the caller's process (a notebook, a sweep that tries configs).
            self.close()
            raise

    def _setup(self, resume: str | Path | None) -> None:
        cfg = self.cfg
        self._setup_data()  # local files first: their errors need no server
        self._setup_rewards()
        self._check_reference_coverage()
        self._setup_model()
        self.schedule = DiscriminatorSchedule(
            mode=cfg.adversarial.schedule if cfg.adversarial.discriminator else "off",
            ratio_k=cfg.adversarial.ratio_k,
        )
        self.metrics = MetricsWriter(self.out, tensorboard=cfg.run.tensorboard, enabled=self.is_main)
        self._ref_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reference-scoring")
        self.reward_log = JsonlWriter(self.out / f"rewards-rank{self.rank}.jsonl")
        # Per rank, which model trained in each epoch and on which means: ranks must agree.
        self.schedule_log = JsonlWriter(self.out / f"schedule-rank{self.rank}.jsonl")
        if resume is not None:
            self._resume(resume)
        healthcheck.progress("ready", epoch=self.state.epoch)

    # ------------------------------------------------------------------ setup

    def _setup_rewards(self) -> None:
        r = self.cfg.reward
        for key in ("tls_ca", "tls_cert", "tls_key"):
            path = getattr(r, key)
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"reward.{key}: {path} is not a readable file")
        self.client = RewardClient(
            r.server,
            token=reward_token(r.token),
            tls=r.tls,
            tls_ca=r.tls_ca,
            tls_cert=r.tls_cert,
            tls_key=r.tls_key,
            tls_server_name=r.tls_server_name,
            timeout_s=r.timeout_s,
            encoding=r.encoding,
            keep_freed_memory=r.keep_freed_memory,
            shared_memory=r.shared_memory,
            max_message_bytes=r.max_message_bytes,
            retry=RetryPolicy(max_elapsed_s=r.retry_budget_s),
        )
        try:
            self.client.wait_ready(timeout_s=r.connect_timeout_s)
            models = {m.name: m for m in self.client.list_models()}
            via = "shared memory" if self.client.uses_shared_memory() else "the socket"  # "auto" asks here
        except (TimeoutError, Exception) as exc:  # noqa: BLE001 - any failure here means "unreachable"
            raise ConfigError(f"reward.server {r.server}: reward server unreachable ({_short(exc)})") from None
        unknown = sorted(set(r.weights) - set(models))
        if unknown:
            raise ConfigError(
                f"reward.weights: {unknown[0]!r} is not served by {r.server} (models: {', '.join(models)})"
            )
        disc = self.cfg.adversarial.discriminator
        if disc:
            if disc not in models:
                raise ConfigError(f"adversarial.discriminator: {disc!r} is not served by {r.server}")
            if not models[disc].trainable:
                raise ConfigError(f"adversarial.discriminator: {disc!r} on {r.server} is not trainable")
        self.server_models = models
        # Every score call asks for at least these versions (ScoreRequest.min_versions): the
        # trainable models' versions now, each raised by the trainer's own updates.
        self.version_floor = VersionFloor({m.name: m.version for m in models.values() if m.trainable})
        log.info("reward server %s: image bytes go through %s", r.server, via)
        if disc and self.cfg.adversarial.schedule != "off" and not self.client.uses_shared_memory():
            self._check_update_size()
        ev = self.cfg.run
        unknown = sorted(set(ev.eval_weights) - set(models))
        if unknown:
            raise ConfigError(
                f"run.eval_weights: {unknown[0]!r} is not served by {r.server} (models: {', '.join(models)})"
            )
        if ev.eval_similarity and ev.eval_similarity not in models:
            log.warning(
                "run.eval_similarity: %r is not served by %s: evaluations report no DINO similarity",
                ev.eval_similarity, r.server,
            )  # fmt: skip
        # The discriminator's own reward is always computed (weight 0 if not part of the spec), so
        # generated and reference means can be compared.
        self.score_weights = dict(r.weights)
        if disc and disc not in self.score_weights:
            self.score_weights[disc] = 0.0

    def _check_update_size(self) -> None:
        """A discriminator update is one request: through the socket it must fit the message limit.
        Refused at start-up when even PNG (which rarely compresses generated images 3x) cannot make
        it fit, rather than after an epoch of sampling; a warning when it needs PNG."""
        cfg, limit = self.cfg, self.client.max_message_bytes
        generated = cfg.sampling.batch_size * cfg.sampling.batches_per_epoch * self.world
        images = generated + (cfg.adversarial.references_per_update or generated)
        raw = images * cfg.model.resolution**2 * 3
        fixes = (
            "run the reward server on this host with shared memory (reward.shared_memory), raise "
            "server.max_message_bytes (at most 2 GiB) and reward.max_message_bytes to match, or lower "
            "adversarial.references_per_update"
        )
        if raw > 3 * limit:
            raise ConfigError(
                f"adversarial.references_per_update: a discriminator update carries {images} images "
                f"({raw / 2**20:.0f} MiB raw) through the socket, over 3x the message limit of {limit / 2**20:.0f} MiB "
                f"(max_message_bytes): {fixes}"
            )
        if raw > limit:
            log.warning(
                "a discriminator update (%d images, %.0f MiB raw) goes as PNG to fit %.0f MiB; if it still does not "
                "fit, the update fails: %s", images, raw / 2**20, limit / 2**20, fixes,
            )  # fmt: skip

    def _setup_data(self) -> None:
        cfg = self.cfg
        self.references: ReferenceSet | None = None
        if cfg.adversarial.references is not None:
            self.references = load_reference_set(cfg.adversarial.references)
        if cfg.data.prompts is not None:
            self.prompts = load_prompts(cfg.data.prompts)
        else:
            self.prompts = self.references.prompts
        self.eval_prompts = cfg.data.eval_prompts or self.prompts[: cfg.run.eval_images]
        self.eval_references = self.references
        if cfg.data.eval_references is not None:
            self.eval_references = load_reference_set(cfg.data.eval_references)

    def _check_reference_coverage(self) -> None:
        disc = self.cfg.adversarial.discriminator
        if self.references is not None and disc and self.server_models[disc].kind == "pickscore":
            check_coverage(self.references, self.prompts)  # the pairwise loss needs each prompt's refs

    def _setup_model(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.run.seed)
        self.dtype = getattr(torch, cfg.model.dtype)
        self.pipe = sd3.load_sd3_pipeline(
            cfg.model.pretrained, dtype=self.dtype, device=self.device, seed=cfg.model.seed
        )
        # The VAE decodes in its own dtype (model.vae_dtype, fp32 by default), whatever the transformer's.
        vae_dtype = getattr(torch, cfg.model.vae_dtype)
        if self.pipe.vae.dtype != vae_dtype:  # (diffusers warns on every cast, even a no-op one)
            self.pipe.vae.to(dtype=vae_dtype)
        self.transformer = self.pipe.transformer
        self.lora_params = sd3.add_lora(self.transformer, cfg.lora)
        self.lora_names = [n for n, p in self.transformer.named_parameters() if p.requires_grad]
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(
            self.lora_params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay, eps=o.eps
        )
        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            # No dataloader goes through prepare, so DeepSpeed cannot infer its micro-batch ("auto").
            ds_config = self.accelerator.state.deepspeed_plugin.deepspeed_config
            ds_config["train_micro_batch_size_per_gpu"] = o.train_batch_size
        self.transformer, self.optimizer = self.accelerator.prepare(self.transformer, self.optimizer)
        passes = backward_passes_per_step(cfg)
        if (
            self.accelerator.distributed_type == DistributedType.DEEPSPEED
            and self.accelerator.gradient_accumulation_steps != passes
        ):
            raise ConfigError(
                f"accelerate config: DeepSpeed accumulates {self.accelerator.gradient_accumulation_steps} backward passes per "
                f"step, but the config needs {passes} (micro-batches per optimizer step x trained steps); remove "
                "gradient_accumulation_steps from the accelerate config (the trainer sets it)"
            )
        self.ema = EMA(self.lora_params, decay=o.ema_decay, update_every=o.ema_every) if o.ema else None
        vae_scale = 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)
        side = cfg.model.resolution // vae_scale
        self.latent_shape = (self.pipe.transformer.config.in_channels, side, side)
        self._cond_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        neg = sd3.encode_negative_prompt(
            self.pipe, device=self.device, max_sequence_length=cfg.model.max_sequence_length
        )
        self.neg_embeds, self.neg_pooled = neg
        cut = sd3.truncated_prompts(self.pipe, self.prompts, cfg.model.max_sequence_length)
        if cut and self.is_main:
            log.info(
                "%d of %d prompts are longer than model.max_sequence_length=%d T5 tokens; the text encoder "
                "sees their first %d tokens (e.g. %r)",
                len(cut), len(self.prompts), cfg.model.max_sequence_length, cfg.model.max_sequence_length, cut[0],
            )  # fmt: skip

    def _conditioning(self, prompts: list[str]) -> Conditioning:
        todo = [p for p in dict.fromkeys(prompts) if p not in self._cond_cache]
        for p in todo:
            # Text encoders are frozen: each prompt is encoded once per run, alone, so its
            # embedding never depends on which prompts it happened to be batched with.
            embeds, pooled = sd3.encode_prompts(
                self.pipe, [p], device=self.device, max_sequence_length=self.cfg.model.max_sequence_length
            )
            self._cond_cache[p] = (embeds[0], pooled[0])
        embeds = torch.stack([self._cond_cache[p][0] for p in prompts])
        pooled = torch.stack([self._cond_cache[p][1] for p in prompts])
        b = len(prompts)
        return Conditioning(embeds, pooled, self.neg_embeds.expand(b, -1, -1), self.neg_pooled.expand(b, -1))

    # ------------------------------------------------------------------ epochs

    def _epoch_ids(self, epoch: int) -> list[int]:
        """Every rank's images of the epoch, as prompt indices, rank by rank: every group of
        group_size images of one prompt, shuffled across all ranks' batches (Flow-GRPO's repeat
        sampler). The same list on every rank."""
        s = self.cfg.sampling
        total = s.batch_size * s.batches_per_epoch * self.world
        n_groups = total // s.group_size
        rng = random.Random(derived_seed(self.cfg.run.seed, epoch, "prompts"))
        if n_groups <= len(self.prompts):
            chosen = rng.sample(range(len(self.prompts)), n_groups)
        else:
            chosen = [rng.randrange(len(self.prompts)) for _ in range(n_groups)]
        ids = [p for p in chosen for _ in range(s.group_size)]
        rng.shuffle(ids)
        return ids

    def epoch_prompt_ids(self, epoch: int) -> list[int]:
        """This rank's images for the epoch, as prompt indices."""
        ids = self._epoch_ids(epoch)
        per_rank = len(ids) // self.world
        return ids[self.rank * per_rank : (self.rank + 1) * per_rank]

    def sample_epoch(self, epoch: int, stream: RewardStream) -> EpochSamples:
        s, cfg = self.cfg.sampling, self.cfg
        ids = self.epoch_prompt_ids(epoch)
        gen = torch.Generator(device="cpu").manual_seed(derived_seed(cfg.run.seed, epoch, self.rank, "noise"))
        wgen = torch.Generator(device="cpu").manual_seed(derived_seed(cfg.run.seed, epoch, "window"))
        window = sde_window(
            s.num_steps,
            s.sde_window or s.num_steps,
            start=s.sde_window_start,
            start_range=s.sde_window_range,
            generator=wgen,
        )
        trajectories, images = [], []
        self.transformer.eval()
        for b in range(s.batches_per_epoch):
            batch_ids = ids[b * s.batch_size : (b + 1) * s.batch_size]
            prompts = [self.prompts[i] for i in batch_ids]
            traj = sample_with_logprobs(
                self.transformer,
                self.pipe.scheduler,
                self._conditioning(prompts),
                num_steps=s.num_steps,
                guidance_scale=s.guidance_scale,
                step=s.step,
                noise_level=s.noise_level,
                window=window,
                latent_shape=self.latent_shape,
                generator=gen,
                device=self.device,
                dtype=self.dtype,
            )
            batch_images = to_uint8(sd3.decode_latents(self.pipe, traj.final_latents))
            # Stream each prompt's images of this batch right away: the server scores them while
            # the next batch samples.
            for pid in dict.fromkeys(batch_ids):
                idx = [j for j, i in enumerate(batch_ids) if i == pid]
                stream.submit(f"e{epoch}-r{self.rank}-b{b}-p{pid}", self.prompts[pid], [batch_images[j] for j in idx])
                self._submitted.append([b * s.batch_size + j for j in idx])
            trajectories.append(traj)
            images.extend(batch_images)
            healthcheck.progress("sampling", epoch=epoch, batch=b)
        return EpochSamples(torch.tensor(ids), trajectories, images)

    def run(self) -> None:
        from tqdm.auto import tqdm

        cfg = self.cfg
        epochs = range(self.state.epoch, cfg.run.epochs)
        bar = tqdm(epochs, desc="adv-grpo", disable=not self.is_main, unit="epoch")
        for epoch in bar:
            metrics = self.train_epoch(epoch)
            bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", d_version=metrics.get("d_version", "-"))
            last = epoch == cfg.run.epochs - 1
            if cfg.run.eval_every and (epoch + 1) % cfg.run.eval_every == 0 or last:
                self.evaluate(epoch)
                healthcheck.progress("evaluated", epoch=epoch)
            if cfg.run.save_every and (epoch + 1) % cfg.run.save_every == 0 or last:
                self.save(epoch + 1)
                healthcheck.progress("saved", epoch=epoch)
        self.close()

    def close(self) -> None:
        """Closes the logs and the reward client (``run`` does at its end; a caller that drives
        ``train_epoch`` itself, such as experiments/toy_world, does when it is done, or uses the
        trainer as a context manager). Safe to call twice, and on a trainer whose start failed."""
        for part in ("metrics", "reward_log", "schedule_log", "client"):
            if (resource := self.__dict__.get(part)) is not None:
                resource.close()
        if (pool := self.__dict__.get("_ref_pool")) is not None:
            pool.shutdown()

    def __enter__(self) -> AdvGrpoTrainer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        cfg = self.cfg
        disc = cfg.adversarial.discriminator
        t0 = time.perf_counter()
        # The epoch's references depend only on its prompts: score them while the batches sample.
        refs_future = self._ref_pool.submit(self._score_references, epoch) if disc else None
        stream = RewardStream(
            self.client, self.score_weights, overlap=cfg.reward.overlap, min_versions=self.version_floor.min_versions()
        )
        self._submitted: list[list[int]] = []
        samples = self.sample_epoch(epoch, stream)
        t_sample = time.perf_counter() - t0 - (0 if cfg.reward.overlap else stream.wait_s)
        # Rewards, in image order.
        t1 = time.perf_counter()
        scores = score_epoch(stream, cfg.reward.retry_budget_s, epoch)
        n = len(samples.images)
        rewards = torch.zeros(n)
        components: dict[str, torch.Tensor] = {k: torch.zeros(n) for k in self.score_weights}
        versions: dict[str, int] = {}
        for idx, score in zip(self._submitted, scores, strict=True):
            # Every reward is kept with the model versions that produced it.
            self.reward_log.write(
                {
                    "epoch": epoch,
                    "rank": self.rank,
                    "group_id": score.group_id,
                    "prompt": self.prompts[int(samples.prompt_ids[idx[0]])],
                    "rewards": score.rewards,
                    "components": score.components,
                    "model_versions": score.model_versions,
                }
            )
            rewards[idx] = torch.tensor(score.rewards)
            for k, v in score.components.items():
                components[k][idx] = torch.tensor(v)
            for k, v in score.model_versions.items():
                versions[k] = max(versions.get(k, 0), v)
        metrics: dict[str, Any] = {"epoch": epoch}
        ref_sum, ref_count = refs_future.result() if refs_future is not None else (0.0, 0)
        t_reward = time.perf_counter() - t1 + (stream.wait_s if not cfg.reward.overlap else 0.0)

        all_rewards = self.accelerator.gather(rewards.to(self.device)).cpu()
        all_ids = self.accelerator.gather(samples.prompt_ids.to(self.device)).cpu()
        o = cfg.optim
        advantages_all = group_advantages(all_rewards, all_ids, global_std=o.global_std, clip=o.adv_clip_max)
        advantages = advantages_all.view(self.world, -1)[self.rank]
        metrics.update(
            reward_mean=all_rewards.mean().item(),
            reward_std=all_rewards.std(unbiased=False).item(),
            reward_versions=versions,
            # Groups whose rewards are all equal: no advantage, nothing learnt from them.
            zero_variance_share=zero_variance_share(all_rewards, all_ids),
        )
        for k, v in components.items():
            gathered = self.accelerator.gather(v.to(self.device)).cpu()
            metrics[f"reward_{k}_mean"] = gathered.mean().item()
            metrics[f"reward_{k}_std"] = gathered.std(unbiased=False).item()
        # The schedule's means over every rank's images, so that every rank takes the same branch.
        gen_mean = metrics[f"reward_{disc}_mean"] if disc else None
        ref_mean = None
        if disc:
            totals = self.accelerator.reduce(
                torch.tensor([ref_sum, ref_count], dtype=torch.float64, device=self.device), "sum"
            )
            ref_mean = float(totals[0] / totals[1]) if totals[1] > 0 else None
            metrics.update(generated_mean=gen_mean, reference_mean=ref_mean)

        t2 = time.perf_counter()
        phase = (
            "discriminator" if disc and self.schedule.trains_discriminator(epoch, gen_mean, ref_mean) else "generator"
        )
        self.schedule_log.write(
            {"epoch": epoch, "rank": self.rank, "phase": phase, "generated_mean": gen_mean, "reference_mean": ref_mean}
        )
        if phase == "discriminator":
            metrics.update(self._update_discriminator(epoch, samples))
        else:  # exactly one of the two trains per epoch (Adv-GRPO)
            metrics.update(self._grpo_update(epoch, samples, advantages))
        t_train = time.perf_counter() - t2
        metrics.update(
            time_sample_s=t_sample,
            time_reward_s=t_reward,
            time_train_s=t_train,
            time_epoch_s=time.perf_counter() - t0,
            global_step=self.state.global_step,
        )
        self.state.epoch = epoch + 1
        self.metrics.write(self.state.global_step, metrics)
        healthcheck.progress("epoch done", epoch=epoch)
        return metrics

    def epoch_references(self, epoch: int) -> list[tuple[str, list[Path]]]:
        """The references of the epoch, the same on every rank: the prompts of every rank's groups
        first, ``adversarial.references_per_update`` images (0: as many as the epoch's generations
        over all ranks, as the original)."""
        if self.references is None:
            return []
        s = self.cfg.sampling
        budget = self.cfg.adversarial.references_per_update or s.batch_size * s.batches_per_epoch * self.world
        rng = random.Random(derived_seed(self.cfg.run.seed, epoch, "references"))
        prompts = [self.prompts[i] for i in dict.fromkeys(self._epoch_ids(epoch))]
        return list(self.references.pick(prompts, budget, rng).items())

    def _load_references(self, chosen: list[tuple[str, list[Path]]], first: int = 0) -> list[Group]:
        res = self.cfg.model.resolution
        return [
            Group(p, [load_reference_image(path, res) for path in paths], f"ref-{first + i}")
            for i, (p, paths) in enumerate(chosen)
        ]

    def _score_references(self, epoch: int) -> tuple[float, int]:
        """This rank's share of the epoch's references (every world-th group), scored by the
        discriminator: (sum of rewards, count), summed over ranks by the caller."""
        # Only the epoch's own prompts' references, as the original's reference mean: references of
        # other prompts that fill the update's budget are left out of the comparison.
        own = {self.prompts[i] for i in self._epoch_ids(epoch)}
        chosen = self.epoch_references(epoch)
        share = [(i, c) for i, c in enumerate(chosen) if i % self.world == self.rank and c[0] in own]
        if not share:
            return 0.0, 0
        groups = [g for i, c in share for g in self._load_references([c], first=i)]
        disc = self.cfg.adversarial.discriminator
        scored = self.client.score(groups, {disc: 1.0}, self.version_floor.min_versions())
        self.version_floor.check(scored)
        values = [v for s in scored for v in s.components[disc]]
        return float(np.sum(values, dtype=np.float64)), len(values)

    def _gather_to_main(self, t: torch.Tensor) -> torch.Tensor | None:
        """Every rank's ``t`` (same shape on all) concatenated on the main process; None elsewhere."""
        if self.world == 1:
            return t
        import torch.distributed as dist

        local = t.to(self.device).contiguous()
        parts = [torch.empty_like(local) for _ in range(self.world)] if self.is_main else None
        dist.gather(local, parts, dst=0)
        return torch.cat(parts).cpu() if self.is_main else None

    def _update_discriminator(self, epoch: int, samples: EpochSamples) -> dict[str, Any]:
        """One UpdateDiscriminator with every rank's generations and the epoch's references, sent
        by the main process (one shared server: one atomic update per epoch)."""
        disc = self.cfg.adversarial.discriminator
        images = self._gather_to_main(torch.from_numpy(np.stack(samples.images)))
        ids = self._gather_to_main(samples.prompt_ids)
        out: dict[str, Any] = {}
        if self.is_main:
            by_prompt: dict[int, list[np.ndarray]] = {}
            for pid, img in zip(ids.tolist(), images.numpy(), strict=True):
                by_prompt.setdefault(pid, []).append(img)
            generated = [Group(self.prompts[p], imgs, f"gen-{p}") for p, imgs in by_prompt.items()]
            references = self._load_references(self.epoch_references(epoch))
            result = self.client.update_discriminator(
                disc,
                references,
                generated,
                steps=self.cfg.adversarial.steps,
                update_id=f"{self.cfg.run.output_dir}:{epoch}:{derived_seed(self.cfg.run.seed, epoch)}",
            )
            self.state.discriminator_versions[disc] = result.version
            self.version_floor.raise_to(disc, result.version)
            out = {
                "d_loss": result.loss,
                "d_accuracy": result.accuracy,
                "d_version": result.version,
                "d_reference_score": result.reference_score,
                "d_generated_score": result.generated_score,
                "d_references": sum(len(g.images) for g in references),
                "d_generated": len(images),
                "d_generated_prompts": {self.prompts[p]: len(imgs) for p, imgs in by_prompt.items()},
            }
        # The next epoch's rewards on every rank must come from the updated discriminator: every
        # rank asks for the version the main process's update returned.
        if self.world > 1:
            from accelerate.utils import broadcast

            version = self.version_floor.min_versions()[disc]
            version = int(broadcast(torch.tensor([version], dtype=torch.int64, device=self.device), 0).item())
            self.version_floor.raise_to(disc, version)
        self.accelerator.wait_for_everyone()
        return out

    def _grpo_update(self, epoch: int, samples: EpochSamples, advantages: torch.Tensor) -> dict[str, Any]:
        """``optim.steps_per_epoch`` optimizer steps per inner epoch, each accumulated over an equal
        share of the epoch's micro-batches (shuffled, Flow-GRPO) and over the trained steps."""
        cfg, o = self.cfg, self.cfg.optim
        batch = TrainBatch.from_samples(samples, advantages, self.prompts)
        steps = self.trained_steps(batch)
        n = batch.old_log_probs.shape[0]
        gen = torch.Generator().manual_seed(derived_seed(cfg.run.seed, epoch, self.rank, "train"))
        per_step = n // o.train_batch_size // o.steps_per_epoch
        stats: dict[str, list[float]] = {"loss": [], "policy_loss": [], "kl": [], "clip_frac": [], "approx_kl": []}
        self.transformer.train()
        for _ in range(o.inner_epochs):
            micro = list(torch.randperm(n, generator=gen).split(o.train_batch_size))
            for k in range(o.steps_per_epoch):
                self.accumulate_gradients(batch, micro[k * per_step : (k + 1) * per_step], steps, stats)
                grad_norm = self.accelerator.clip_grad_norm_(self.lora_params, o.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.state.global_step += 1
                if self.ema is not None:
                    self.ema.step(self.state.global_step)
                healthcheck.progress("training", epoch=epoch, step=self.state.global_step)
        self.transformer.eval()
        out = {f"train_{k}": float(np.mean(v)) for k, v in stats.items() if v}
        # (accelerate returns None where the backend clips itself, as DeepSpeed does.)
        out["train_grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        out["train_steps"] = len(steps)
        return out

    def trained_steps(self, batch: "TrainBatch") -> list[int]:
        """Positions in the stored window of the steps to train (Flow-GRPO's timestep selection);
        a deterministic one among them is an error, never a division by zero."""
        s = self.cfg.sampling
        t = batch.trajectory
        steps = trained_steps(t.step_indices, s.num_steps, self.cfg.optim.timestep_fraction)
        try:
            check_trainable_steps(
                steps, t.step_indices, t.sigmas, t.sigmas_next, step=s.step, noise_level=s.noise_level,
                sigma_max=t.sigma_max,
            )  # fmt: skip
        except ValueError as exc:
            raise ConfigError(f"sampling/optim: {exc}") from None
        return steps

    def accumulate_gradients(
        self,
        batch: "TrainBatch",
        micro_batches: list[torch.Tensor],
        steps: list[int],
        stats: dict[str, list[float]] | None = None,
    ) -> None:
        """Backward of the GRPO loss for every (micro-batch, step), accumulated into one gradient:
        that of the mean loss over all of them, i.e. (equal micro-batches) of one micro-batch that
        holds them all. accelerate's accumulation scales each loss and, under DDP, all-reduces only
        on the last backward; the caller steps the optimizer."""
        s, o = self.cfg.sampling, self.cfg.optim
        t = batch.trajectory
        passes = len(micro_batches) * len(steps)
        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            if passes != self.accelerator.gradient_accumulation_steps:
                raise RuntimeError(
                    f"accumulate_gradients: {passes} backward passes, but DeepSpeed accumulates "
                    f"{self.accelerator.gradient_accumulation_steps} (fixed at start-up)"
                )
        else:
            self.accelerator.gradient_accumulation_steps = passes
        self.accelerator.step = 0  # accelerate counts backward passes; every optimizer step starts anew
        kw = dict(
            guidance_scale=s.guidance_scale,
            step=s.step,
            noise_level=s.noise_level,
            sigma_max=t.sigma_max,
            dtype=self.dtype,
        )
        for mb in micro_batches:
            cond = self._conditioning([batch.prompts[i] for i in mb.tolist()])
            for j in steps:
                args = (
                    batch.latents[mb, j],
                    batch.next_latents[mb, j],
                    t.timesteps[j],
                    t.sigmas[j],
                    t.sigmas_next[j],
                    cond,
                )
                with self.accelerator.accumulate(self.transformer):
                    with self.accelerator.autocast():
                        out = step_log_prob(self.transformer, *args, **kw)
                        kl = None
                        if o.beta > 0:
                            with torch.no_grad(), sd3.lora_disabled(self.accelerator.unwrap_model(self.transformer)):
                                ref_out = step_log_prob(self.transformer, *args, **kw)
                            # Flow-GRPO scale: divided by std_t (not std_t*sqrt(-dt)), so its beta carries over.
                            kl = kl_to_reference(out.mean, ref_out.mean, out.std_t)
                        loss, st = grpo_loss(
                            out.log_prob,
                            batch.old_log_probs[mb, j],
                            batch.advantages[mb],
                            o.clip_range,
                            kl=kl,
                            beta=o.beta,
                        )
                    self.accelerator.backward(loss)
                if stats is not None:
                    stats["loss"].append(loss.item())
                    for k in ("policy_loss", "kl", "clip_frac", "approx_kl"):
                        if k in st:
                            stats[k].append(float(st[k]))
        if not self.accelerator.sync_gradients:
            raise RuntimeError("accumulate_gradients: accelerate did not reach its synchronising backward")

    # ------------------------------------------------------------------ eval, checkpoints

    def evaluate(self, epoch: int) -> Path | None:
        if not self.is_main:
            return None
        with self._ema_weights():
            images = generate_images(self.pipe, self.eval_prompts, self.cfg, seed=self.cfg.run.seed)
        path = save_grid(images, self.out / "samples" / f"epoch-{epoch + 1:06d}.png")
        record: dict[str, Any] = {"epoch": epoch, "eval_grid": str(path)}
        record.update(self.eval_scores(images))
        self.metrics.write(self.state.global_step, record)
        return path

    def eval_scores(self, images: list[np.ndarray]) -> dict[str, float]:
        """The eval images' training reward and, as Adv-GRPO's evaluation reports it, their DINO
        similarity to the eval prompts' references (the server's ``run.eval_similarity`` model:
        cosine of DINOv2 CLS embeddings, maximum over a prompt's references)."""
        weights = dict(self.cfg.run.eval_weights or self.cfg.reward.weights)
        groups = [
            Group(p, [img], f"eval-{i}") for i, (p, img) in enumerate(zip(self.eval_prompts, images, strict=True))
        ]
        scored = self.client.score(groups, weights, self.version_floor.min_versions())
        out = {"eval_reward_mean": float(np.mean([s.rewards[0] for s in scored]))}
        for k in weights:
            out[f"eval_reward_{k}_mean"] = float(np.mean([s.components[k][0] for s in scored]))
        sim = self.cfg.run.eval_similarity
        refs = self.eval_references
        if sim and sim in self.server_models and refs is not None:
            res = self.cfg.model.resolution
            with_refs = [
                Group(
                    g.prompt,
                    g.images,
                    g.group_id,
                    references=[load_reference_image(path, res) for path in refs.images[g.prompt]],
                )
                for g in groups
                if g.prompt in refs.images
            ]
            if with_refs:
                similar = self.client.score(with_refs, {sim: 1.0}, self.version_floor.min_versions())
                values = [s.components[sim][0] for s in similar]
                out["eval_similarity_mean"] = float(np.mean(values))
                out["eval_similarity_images"] = len(values)
        return out

    def _ema_weights(self):
        import contextlib

        return self.ema.swap_in(self.lora_params) if self.ema is not None else contextlib.nullcontext()

    def save(self, next_epoch: int) -> Path | None:
        if not self.is_main:
            return None
        cfg = self.cfg
        tensors = {f"lora.{n}": p for n, p in zip(self.lora_names, self.lora_params, strict=True)}
        from advgrpo.common.optimizer_state import optimizer_state_to_tensors

        opt_tensors, opt_groups = optimizer_state_to_tensors(self.optimizer)
        tensors.update(opt_tensors)
        if self.ema is not None:
            tensors.update({f"ema.{k}": v for k, v in self.ema.state_dict().items() if torch.is_tensor(v)})

        def write_lora(path: Path) -> None:
            with self._ema_weights():
                sd3.save_lora(self.accelerator.unwrap_model(self.transformer), path)
            (path / "advgrpo.json").write_text(_json(generation_settings(cfg)))

        meta = {
            "optimizer": opt_groups,
            "config": without_secrets(dump_train_config(cfg)),
            "ema_meta": {
                k: v for k, v in (self.ema.state_dict().items() if self.ema else []) if not torch.is_tensor(v)
            },
        }
        self.state.epoch = next_epoch
        return save_checkpoint(
            checkpoint_dir(self.out, next_epoch), state=self.state, tensors=tensors, meta=meta, write_lora=write_lora
        )

    def _resume(self, resume: str | Path) -> None:
        directory = latest_checkpoint(self.out) if str(resume) == "latest" else Path(resume)
        if directory is None:
            log.info("--resume: no checkpoint under %s, starting fresh", self.out)
            return
        state, tensors, meta = load_checkpoint(directory)
        changed = recipe_changes(meta.get("config", {}), dump_train_config(self.cfg))
        if changed:
            raise ConfigError(
                f"--resume: {directory} was trained with another recipe ({'; '.join(changed[:8])}"
                f"{'; ...' if len(changed) > 8 else ''}); resume with the same settings, or start a new --output-dir"
            )
        with torch.no_grad():
            for name, p in zip(self.lora_names, self.lora_params, strict=True):
                p.copy_(tensors[f"lora.{name}"])
        from advgrpo.common.optimizer_state import optimizer_state_from_tensors

        optimizer_state_from_tensors(self.optimizer, tensors, meta["optimizer"])
        if self.ema is not None:
            ema_state = {k[len("ema.") :]: v for k, v in tensors.items() if k.startswith("ema.")}
            ema_state.update(meta.get("ema_meta", {}))
            self.ema.load_state_dict(ema_state)
        self.state = state
        log.info("resumed from %s at epoch %d (step %d)", directory, state.epoch, state.global_step)
        for model, version in state.discriminator_versions.items():
            serving = self.server_models[model].version if model in self.server_models else None
            if serving is not None and serving < version:
                log.warning(
                    "--resume: the checkpoint's run had %s at version %d, but %s serves version %d (its state "
                    "was lost or replaced?): rewards come from that older discriminator",
                    model, version, self.cfg.reward.server, serving,
                )  # fmt: skip


@dataclass
class TrainBatch:
    """An epoch's stored transitions of this rank, flattened over its sampling batches."""

    latents: torch.Tensor  # [N, S, C, h, w]
    next_latents: torch.Tensor  # [N, S, C, h, w]
    old_log_probs: torch.Tensor  # [N, S]
    advantages: torch.Tensor  # [N]
    prompts: list[str]  # [N]
    trajectory: Trajectory  # the first batch's: timesteps, sigmas and step indices (the same for all)

    @classmethod
    def from_samples(cls, samples: EpochSamples, advantages: torch.Tensor, prompts: list[str]) -> "TrainBatch":
        traj = samples.trajectories
        return cls(
            latents=torch.cat([t.latents for t in traj]),
            next_latents=torch.cat([t.next_latents for t in traj]),
            old_log_probs=torch.cat([t.log_probs for t in traj]),
            advantages=advantages,
            prompts=[prompts[i] for i in samples.prompt_ids.tolist()],
            trajectory=traj[0],
        )


# The sections that make up the method: a checkpoint resumes only under the same values.
RECIPE_SECTIONS = ("model", "lora", "sampling", "optim", "adversarial")
RECIPE_EXEMPT = {"adversarial.references"}  # where the reference files live may change


def recipe_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: saved -> current`` for every recipe value that differs (JSON-normalised: tuples and
    lists compare equal)."""
    import json

    def flat(section: str, value: Any) -> dict[str, Any]:
        if isinstance(value, dict):
            return {k: v for key, sub in value.items() for k, v in flat(f"{section}.{key}", sub).items()}
        return {section: json.loads(json.dumps(value))}

    before = {k: v for s in RECIPE_SECTIONS for k, v in flat(s, saved.get(s, {})).items()}
    after = {k: v for s in RECIPE_SECTIONS for k, v in flat(s, current.get(s, {})).items()}
    keys = sorted((set(before) | set(after)) - RECIPE_EXEMPT)
    return [f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in keys if before.get(k) != after.get(k)]


def generation_settings(cfg: TrainConfig) -> dict[str, Any]:
    """What advgrpo-generate needs to reproduce the trainer's eval images."""
    return {
        "pretrained": cfg.model.pretrained,
        "model_seed": cfg.model.seed,
        "dtype": cfg.model.dtype,
        "vae_dtype": cfg.model.vae_dtype,
        "resolution": cfg.model.resolution,
        "num_steps": cfg.sampling.eval_num_steps,
        "guidance_scale": cfg.sampling.guidance_scale,
        "max_sequence_length": cfg.model.max_sequence_length,
        "seed": cfg.run.seed,
    }


TOKEN_ENV = "ADVGRPO_AUTH_TOKEN"


def reward_token(configured: str | None) -> str | None:
    """``reward.token``, else ``$ADVGRPO_AUTH_TOKEN`` (the variable the reward server reads). Read
    when the client is made and never written back into the config, so no checkpoint holds it."""
    return configured or os.environ.get(TOKEN_ENV) or None


@torch.no_grad()
def generate_images(
    pipe, prompts: list[str], cfg_or_settings, *, seed: int, progress: bool = False
) -> list[np.ndarray]:
    """Deterministic (ODE) images, one seeded generator per image: the trainer's eval and
    advgrpo-generate call this same function, so they produce the same pixels. ``progress``:
    diffusers' per-step bar (the trainer's eval keeps it off: the epoch bar is the progress)."""
    s = cfg_or_settings if isinstance(cfg_or_settings, dict) else generation_settings(cfg_or_settings)
    pipe.set_progress_bar_config(disable=not progress)
    generators = [torch.Generator(device="cpu").manual_seed(seed + i) for i in range(len(prompts))]
    latents = pipe(
        prompt=list(prompts),
        height=s["resolution"],
        width=s["resolution"],
        num_inference_steps=s["num_steps"],
        guidance_scale=s["guidance_scale"],
        generator=generators,
        max_sequence_length=s["max_sequence_length"],
        output_type="latent",
    ).images
    # Decoded by the VAE in its own dtype (fp32 unless model.vae_dtype says otherwise), like sampling.
    return to_uint8(sd3.decode_latents(pipe, latents))


def _json(obj: Any) -> str:
    import json

    return json.dumps(obj, indent=2)


def _short(exc: BaseException) -> str:
    details = getattr(exc, "details", None)
    if callable(details):
        try:
            return f"{exc.code().name}: {details()}"  # grpc.RpcError
        except Exception:  # noqa: BLE001
            pass
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
