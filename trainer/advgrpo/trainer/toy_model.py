"""Trains the pretrained toy text-to-image model: a small SD3 (diffusers ``SD3Transformer2DModel``
and ``AutoencoderKL``) that draws the toy domain (``advgrpo.common.toy_domain``) from its captions.

The model is a real ``StableDiffusion3Pipeline``: the tiny pipeline's frozen, randomly initialised
text encoders and tokenizers (``build_tiny_sd3_pipeline``), a VAE trained here to reconstruct the
domain (32 px -> 4 x 16 x 16 latents; a VAE rather than a pixel-space stand-in, so that the
trainer runs the same code path on it as on SD3.5: decode, dtypes, latent shapes), and a
transformer trained here with SD3's flow-matching objective (rectified flow, logit-normal
timesteps, 10 % of captions dropped for classifier-free guidance).

The training scenes are a mixture of the domain's two styles (``--night-share``, 25 % night by
default), and the captions never name the style: like a web-trained model that can draw a style
without being asked, the toy model draws night scenes about as often as it saw them, which the
transfer experiment's references can then pull it towards. The transformer ships as the
exponential moving average of its weights, trained with a cosine learning-rate decay.

``python -m advgrpo.trainer.toy_model --output DIR [--steps N]`` writes the pipeline with
``save_pretrained`` (loadable by ``load_sd3_pipeline(DIR)``) and ``training.json``: the exact
command, the seeds, the loss and caption-accuracy curve, the saved pipeline's final accuracy and
night share, and the sha256 of every weight file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from advgrpo.common import toy_domain as td
from advgrpo.trainer import pipeline as sd3

log = logging.getLogger(__name__)

IMAGE_SIZE = 32
LATENT_CHANNELS = 4
TEXT_TOKENS = 24  # CLIP and T5 context (model.max_sequence_length of the toy preset)


def build_untrained(seed: int = 0):
    """The toy pipeline before training: the tiny pipeline's text side, a fresh VAE and transformer."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    pipe = sd3.build_tiny_sd3_pipeline(seed)
    # Captions are at most 17 CLIP and 16 T5 tokens ("a yellow triangle": mostly one per letter); a
    # 24-token context, not CLIP's 77, keeps the transformer's joint attention mostly on the image.
    pipe.tokenizer.model_max_length = TEXT_TOKENS
    pipe.tokenizer_max_length = TEXT_TOKENS
    t5_dim = pipe.text_encoder_3.config.d_model
    pooled = pipe.text_encoder.config.projection_dim + pipe.text_encoder_2.config.projection_dim
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 10)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(16, 32),
            layers_per_block=1,
            latent_channels=LATENT_CHANNELS,
            norm_num_groups=8,
            sample_size=IMAGE_SIZE,
            mid_block_add_attention=False,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
        torch.manual_seed(seed + 11)
        transformer = SD3Transformer2DModel(
            sample_size=IMAGE_SIZE // 2,
            patch_size=2,
            in_channels=LATENT_CHANNELS,
            out_channels=LATENT_CHANNELS,
            num_layers=4,
            attention_head_dim=32,
            num_attention_heads=4,
            joint_attention_dim=t5_dim,
            caption_projection_dim=128,
            pooled_projection_dim=pooled,
            pos_embed_max_size=32,
            qk_norm="rms_norm",
        )
    # A new pipeline around the new modules: it derives its latent size (vae_scale_factor) from the
    # VAE it is built with. Swapping pipe.vae kept the tiny VAE's factor (4, not 2), and samples
    # drawn in training were 8x8 latents (the weights were unaffected; only the curve's accuracy).
    toy = type(pipe)(**{**pipe.components, "vae": vae, "transformer": transformer})
    toy.tokenizer_max_length = TEXT_TOKENS
    return toy


def mixed_dataset(n: int, night_share: float, seed: int) -> tuple[list[np.ndarray], list[str]]:
    """``n`` rendered scenes with random captions, each drawn in the night style with probability
    ``night_share`` (else day); the captions do not say which."""
    rng = np.random.default_rng(seed)
    night = rng.random(n) < night_share
    day_images, day_texts = td.dataset(n, size=IMAGE_SIZE, style="day", seed=seed, per_caption=False)
    night_images, night_texts = td.dataset(n, size=IMAGE_SIZE, style="night", seed=seed + 1, per_caption=False)
    images = [ni if is_night else di for di, ni, is_night in zip(day_images, night_images, night, strict=True)]
    texts = [nt if is_night else dt for dt, nt, is_night in zip(day_texts, night_texts, night, strict=True)]
    return images, texts


def _to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def train_vae(pipe, images: torch.Tensor, *, steps: int, batch: int, seed: int) -> list[float]:
    vae = pipe.vae
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        b = images[torch.randint(0, len(images), (batch,), generator=g)]
        post = vae.encode(b).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample
        loss = (rec - b).abs().mean() + ((rec - b) ** 2).mean() + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for group in opt.param_groups:  # cosine decay to 10 %
            group["lr"] = 2e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step + 1) / steps)))
        if step % 50 == 0 or step == steps - 1:
            losses.append(loss.item())
            log.info("vae step %d/%d loss %.4f", step, steps, losses[-1])
    vae.eval()
    vae.requires_grad_(False)
    # SD3 normalises latents by shift and scale: fit them so that latents have mean 0 and std 1.
    with torch.no_grad():
        z = torch.cat([vae.encode(images[i : i + 256]).latent_dist.mode() for i in range(0, len(images), 256)])
    vae.register_to_config(shift_factor=float(z.mean()), scaling_factor=float(1 / z.std()))
    return losses


@torch.no_grad()
def encode_latents(pipe, images: torch.Tensor) -> torch.Tensor:
    vae = pipe.vae
    z = torch.cat([vae.encode(images[i : i + 256]).latent_dist.mode() for i in range(0, len(images), 256)])
    return (z - vae.config.shift_factor) * vae.config.scaling_factor


def text_conditioning(pipe, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    embeds, pooled = zip(
        *[sd3.encode_prompts(pipe, [t], device="cpu", max_sequence_length=TEXT_TOKENS) for t in texts], strict=True
    )
    return torch.cat(embeds), torch.cat(pooled)


def sample_accuracy(pipe, n_per_caption: int, *, seed: int, steps: int = 10, guidance: float = 4.5) -> dict[str, float]:
    """Caption accuracy (by the rule-based checker) of ODE samples, n per caption, and the share of
    them drawn in the night style."""
    from advgrpo.trainer.loop import generate_images

    texts = [c for c in td.captions() for _ in range(n_per_caption)]
    settings = {
        "resolution": IMAGE_SIZE,
        "num_steps": steps,
        "guidance_scale": guidance,
        "max_sequence_length": TEXT_TOKENS,
    }
    images = generate_images(pipe, texts, settings, seed=seed)
    night = float(np.mean([td.style_of(img) == "night" for img in images]))
    return {**td.caption_accuracy(images, texts), "night": night}


class WeightAverage:
    """An exponential moving average of a module's parameters (decay warmed up as
    min(decay, (1 + step) / (10 + step))): what ships, as diffusion models usually do."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.module, self.decay, self.updates = module, decay, 0
        self.shadow = {n: p.detach().clone() for n, p in module.named_parameters()}

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for n, p in self.module.named_parameters():
            self.shadow[n].lerp_(p.detach(), 1 - d)

    @torch.no_grad()
    def swap(self) -> None:
        """Exchanges the live weights and the average (twice: back as before)."""
        for n, p in self.module.named_parameters():
            live = p.detach().clone()
            p.copy_(self.shadow[n])
            self.shadow[n] = live


def learning_rate(step: int, steps: int, peak: float = 1e-3, warmup: int = 200, floor: float = 0.1) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``floor`` x ``peak`` at ``steps``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def train_transformer(
    pipe,
    latents: torch.Tensor,
    caption_ids: torch.Tensor,
    cond: tuple[torch.Tensor, torch.Tensor],
    *,
    steps: int,
    batch: int,
    seed: int,
    eval_every: int,
    ema_decay: float = 0.999,
) -> list[dict]:
    """SD3's objective for ``steps`` steps; evaluates (and finally keeps) the weight average."""
    embeds, pooled = cond  # row 0: the empty prompt; rows 1..: the captions
    tr = pipe.transformer
    tr.train()
    opt = torch.optim.AdamW(tr.parameters(), lr=learning_rate(0, steps), weight_decay=0.0, betas=(0.9, 0.99))
    average = WeightAverage(tr, ema_decay)
    g = torch.Generator().manual_seed(seed)
    curve: list[dict] = []
    t0 = time.perf_counter()
    running: list[float] = []

    def evaluate(step: int) -> None:
        tr.eval()
        average.swap()
        acc = sample_accuracy(pipe, 4, seed=1000)
        average.swap()
        tr.train()
        curve.append(
            {
                "step": step,
                "minutes": (time.perf_counter() - t0) / 60,
                "loss": float(np.mean(running)) if running else float("nan"),
                **acc,
            }
        )
        log.info("transformer %s", curve[-1])
        running.clear()

    for step in range(steps):
        idx = torch.randint(0, len(latents), (batch,), generator=g)
        x0 = latents[idx]
        ids = caption_ids[idx] + 1
        ids = torch.where(torch.rand(batch, generator=g) < 0.1, torch.zeros_like(ids), ids)  # CFG dropout
        noise = torch.randn(x0.shape, generator=g)
        t = torch.sigmoid(torch.randn(batch, generator=g))  # SD3's logit-normal timesteps
        xt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
        v = tr(
            hidden_states=xt,
            timestep=t * 1000,
            encoder_hidden_states=embeds[ids],
            pooled_projections=pooled[ids],
            return_dict=False,
        )[0]
        loss = ((v - (noise - x0)) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tr.parameters(), 1.0)
        opt.step()
        average.update()
        for group in opt.param_groups:
            group["lr"] = learning_rate(step + 1, steps)
        running.append(loss.item())
        if (step + 1) % eval_every == 0 and step + 1 < steps:
            evaluate(step + 1)
    evaluate(steps)
    average.swap()  # the average is what ships
    tr.eval()
    tr.requires_grad_(False)
    return curve


def file_digests(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*.safetensors"))
    }


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m advgrpo.trainer.toy_model", description=__doc__.splitlines()[0])
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--steps", type=int, default=3000, help="transformer training steps")
    p.add_argument("--vae-steps", type=int, default=3000)
    p.add_argument("--images", type=int, default=24_000, help="rendered training images")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--eval-every", type=positive_int, default=500, help="steps between caption-accuracy checks")
    p.add_argument(
        "--night-share", type=float, default=td.PRETRAINING_NIGHT_SHARE,
        help="share of training scenes in the night style (captions never name the style)",
    )  # fmt: skip
    p.add_argument("--final-samples", type=int, default=25, help="samples per caption for the final accuracy")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    pipe = build_untrained(args.seed)
    images, texts = mixed_dataset(args.images, args.night_share, args.seed)
    x = _to_tensor(images)
    vae_losses = train_vae(pipe, x, steps=args.vae_steps, batch=32, seed=args.seed)
    test_images, test_texts = mixed_dataset(600, 0.5, args.seed + 99)
    with torch.no_grad():
        rec = sd3.decode_latents(pipe, encode_latents(pipe, _to_tensor(test_images)))
    from advgrpo.trainer.loop import to_uint8

    vae_acc = td.caption_accuracy(to_uint8(rec), test_texts)
    log.info("vae reconstructions: %s", vae_acc)
    latents = encode_latents(pipe, x)
    all_captions = td.captions()
    caption_ids = torch.tensor([all_captions.index(t) for t in texts])
    cond = text_conditioning(pipe, ["", *all_captions])
    curve = train_transformer(
        pipe, latents, caption_ids, cond, steps=args.steps, batch=args.batch, seed=args.seed,
        eval_every=args.eval_every,
    )  # fmt: skip
    args.output.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(args.output, safe_serialization=True)
    # The final figure is the saved pipeline's, as it loads: what ships.
    final = sample_accuracy(sd3.load_sd3_pipeline(str(args.output)), args.final_samples, seed=2000)
    record = {
        "command": "python -m advgrpo.trainer.toy_model " + " ".join(argv if argv is not None else sys.argv[1:]),
        "seed": args.seed,
        "torch": torch.__version__,
        "cpu_minutes": (time.perf_counter() - t0) / 60,
        "vae_loss": vae_losses,
        "vae_reconstruction_accuracy": vae_acc,
        "curve": curve,
        "final_samples_per_caption": args.final_samples,
        "final_accuracy": final,
        "sha256": file_digests(args.output),
    }
    (args.output / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    log.info("wrote %s: final caption accuracy %s", args.output, final)
    return 0


if __name__ == "__main__":
    sys.exit(main())
