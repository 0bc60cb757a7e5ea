"""PickScoreModel on a tiny random CLIP: reward formula, determinism, partial training and state.

In-process, no gRPC. The tiny CLIP, tokenizer and image processor are built in memory; one test
saves them with save_pretrained and loads them back by path (the real checkpoints' code path).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from advgrpo.common.errors import ConfigError, FailedPrecondition, InvalidArgument
from advgrpo.reward_server.config import ModelConfig, PickScoreParams
from advgrpo.reward_server.models import build_model
from advgrpo.reward_server.models.pickscore import (
    PickScoreModel,
    pair_mask,
    pairwise_accuracy,
    pairwise_logistic_loss,
)
from advgrpo.reward_server.state import StateStore

SIZE = 48
CAT, DOG = "a cat", "the red dog"


def params(**overrides) -> PickScoreParams:
    base = dict(model="tiny", processor="tiny", lr=1e-3)
    base.update(overrides)
    return PickScoreParams(**base)


def make(**overrides) -> PickScoreModel:
    return PickScoreModel("pickscore", params(**overrides), device="cpu")


def smooth(rng: np.random.Generator) -> np.ndarray:
    colour = rng.uniform(30, 230, size=3)
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    ramp = 0.85 + 0.15 * (np.cos(angle) * xx + np.sin(angle) * yy)
    return np.clip(colour * ramp[..., None], 0, 255).astype(np.uint8)


def noise(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8)


def batch(fn, n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [fn(rng) for _ in range(n)]


def prompts(n: int) -> list[str]:
    return [CAT, DOG] * (n // 2) + [CAT] * (n % 2)


# ---------------------------------------------------------------------------------------------
# Pure math


def test_pairwise_logistic_loss_hand_computed():
    def nls(x):  # −log σ(x)
        return math.log1p(math.exp(-x))

    s_ref = torch.tensor([1.0, 2.0, 0.5])
    s_gen = torch.tensor([0.0, 3.0])
    mask = pair_mask(["p", "p", "q"], ["p", "q"])
    assert mask.tolist() == [[True, False], [True, False], [False, True]]
    # Generation 0 (prompt p) pairs with references 0 and 1; generation 1 (prompt q) with 2.
    want = 0.5 * (0.5 * (nls(1.0) + nls(2.0)) + nls(0.5 - 3.0))
    assert pairwise_logistic_loss(s_ref, s_gen, mask).item() == pytest.approx(want, rel=1e-6)
    # Accuracy counts pairs: (1>0) and (2>0) win, (0.5>3) loses.
    assert pairwise_accuracy(s_ref, s_gen, mask) == pytest.approx(2 / 3)


# ---------------------------------------------------------------------------------------------
# Scoring


def test_reward_is_scaled_clip_logit():
    model = make(scale=26.0)
    imgs, texts = batch(noise, 2, 0) + batch(smooth, 1, 1), [CAT, DOG, "x y z"]
    got = model.score(imgs, texts)
    # Reference value through CLIPModel.forward: logits_per_image = logit_scale.exp() * cos.
    pixels = model.image_processor(images=imgs, return_tensors="pt")["pixel_values"]
    tok = model.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model.model(pixel_values=pixels, input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
    want = out.logits_per_image.diagonal().numpy() / 26.0
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_scores_are_deterministic_and_batch_independent():
    model = make()
    imgs, texts = batch(noise, 3, 2) + batch(smooth, 3, 3), prompts(6)
    first = model.score(imgs, texts)
    assert first.shape == (6,) and first.dtype == np.float32
    assert np.array_equal(model.score(imgs, texts), first)
    # Alone, or in another order: the same reward, bit for bit (on the CPU each image and prompt
    # runs through its tower alone).
    alone = np.array([model.score([i], [t])[0] for i, t in zip(imgs, texts, strict=True)])
    assert np.array_equal(alone, first)
    assert np.array_equal(model.score(imgs[::-1], texts[::-1])[::-1], first)
    # A separately built model with the same seed is bit-identical; another seed is not.
    assert np.array_equal(make().score(imgs, texts), first)
    assert not np.allclose(make(seed=1).score(imgs, texts), first)
    assert model.score([], []).shape == (0,)
    with pytest.raises(InvalidArgument, match="prompts"):
        model.score(imgs, texts[:2])
    model.warmup()


@pytest.mark.parametrize("threads", [1, 2, 5])
def test_rewards_do_not_depend_on_the_batch(threads):
    """The batcher merges requests into batches of any size: an image's reward is the same bit for
    bit alone and in any batch, at any position, with other prompts around it, with 1, 2 or 5
    threads (batched, the towers' one-row-per-image projections rounded differently)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = make()
        imgs = batch(noise, 5, 7) + batch(smooth, 6, 8)
        texts = [CAT, DOG, "x y z", 'a sign saying "7"'] * 2 + [DOG, "x y z", CAT]
        alone = np.array([model.score([i], [t])[0] for i, t in zip(imgs, texts, strict=True)])
        n = len(imgs)
        assert np.array_equal(model.score(imgs, texts), alone)
        for size in (2, 3, 5, 8):
            for start in sorted({0, 1, (n - size) // 2, n - size}):
                sl = slice(start, start + size)
                assert np.array_equal(model.score(imgs[sl], texts[sl]), alone[sl]), f"{size} images from {start}"
        picks = np.concatenate([np.random.default_rng(threads).permutation(n), [0, 0, 4]])  # with duplicates
        got = model.score([imgs[i] for i in picks], [texts[i] for i in picks])
        assert np.array_equal(got, alone[picks])
    finally:
        torch.set_num_threads(before)


def test_split_vision_forward_matches_the_full_one():
    """The update runs frozen blocks once and trained blocks per step: same embeddings as CLIP's."""
    for blocks in (1, 2):
        model = make(trainable_blocks=blocks)
        imgs = batch(noise, 3, 4)
        with torch.no_grad():
            full = model._image_embeddings(imgs)
            split = model._vision_suffix(model._vision_prefix(imgs))
        torch.testing.assert_close(split, full, rtol=0, atol=1e-6)


def test_loads_from_save_pretrained_directories(tmp_path):
    from transformers import CLIPProcessor

    from advgrpo.common.tiny_models import tiny_clip

    clip, tokenizer, image_processor = tiny_clip(seed=0)
    clip.save_pretrained(tmp_path / "model")
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(tmp_path / "processor")

    by_path = make(model=str(tmp_path / "model"), processor=str(tmp_path / "processor"))
    imgs, texts = batch(noise, 2, 5) + batch(smooth, 2, 6), prompts(4)
    np.testing.assert_allclose(by_path.score(imgs, texts), make().score(imgs, texts), rtol=0, atol=1e-6)
    assert str(tmp_path / "model") in by_path.fingerprint()
    # The loaded model trains too.
    result = by_path.update(imgs[2:], texts[2:], imgs[:2], texts[:2], steps=1)
    assert math.isfinite(result.loss)


def test_tiny_model_needs_the_tiny_processor():
    with pytest.raises(ConfigError, match="tiny"):
        make(processor="laion/CLIP-ViT-H-14-laion2B-s32B-b79K")
    with pytest.raises(ConfigError, match="trainable_blocks"):
        make(trainable_blocks=3)
    with pytest.raises(ConfigError, match="trainable_blocks"):
        make(trainable_blocks=0)


def test_build_model_makes_a_pickscore():
    model = build_model(ModelConfig(name="ps", kind="pickscore", params=params()), device="cpu")
    assert isinstance(model, PickScoreModel) and model.trainable and model.kind == "pickscore"


# ---------------------------------------------------------------------------------------------
# Training


def test_only_the_last_vision_block_trains():
    model = make()
    before = {n: p.detach().clone() for n, p in model.model.named_parameters()}
    trainable = {n for n, p in model.model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("vision_model.encoder.layers.1.") for n in trainable)
    refs, gens = batch(smooth, 4, 7), batch(noise, 4, 8)
    model.update(refs, prompts(4), gens, prompts(4), steps=3)
    after = dict(model.model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert changed and changed <= trainable
    assert all(torch.equal(before[n], after[n].detach()) for n in before if n not in trainable)


def test_two_trainable_blocks():
    model = make(trainable_blocks=2)
    trainable = {n for n, p in model.model.named_parameters() if p.requires_grad}
    assert {n.split(".")[3] for n in trainable} == {"0", "1"}
    assert all(n.startswith("vision_model.encoder.layers.") for n in trainable)


def test_update_rejects_unusable_batches():
    model = make()
    refs, gens = batch(smooth, 2, 0), batch(noise, 2, 1)
    with pytest.raises(InvalidArgument, match="no references"):
        model.update([], [], gens, prompts(2), steps=1)
    with pytest.raises(InvalidArgument, match="no generated images"):
        model.update(refs, prompts(2), [], [], steps=1)
    with pytest.raises(InvalidArgument, match=r"generated_prompts\[1\].*'a horse'"):
        model.update(refs, [CAT, CAT], gens, [CAT, "a horse"], steps=1)
    with pytest.raises(InvalidArgument, match="steps"):
        model.update(refs, prompts(2), gens, prompts(2), steps=0)
    with pytest.raises(InvalidArgument, match="generated_prompts"):
        model.update(refs, prompts(2), gens, prompts(1), steps=1)


def test_update_is_deterministic():
    refs, gens = batch(smooth, 4, 9), batch(noise, 4, 10)
    a, b = make(), make()
    torch.manual_seed(1)
    ra = a.update(refs, prompts(4), gens, prompts(4), steps=4)
    torch.manual_seed(2)
    rb = b.update(refs, prompts(4), gens, prompts(4), steps=4)
    assert ra == rb
    assert a.version == 0  # the host moves the version
    probe = batch(noise, 2, 11)
    assert np.array_equal(a.score(probe, prompts(2)), b.score(probe, prompts(2)))


def test_discriminator_learns_references_from_generations():
    model = make(lr=3e-3)
    p = prompts(16)
    refs, gens = batch(smooth, 16, 12), batch(noise, 16, 13)
    held_refs, held_gens = batch(smooth, 16, 22), batch(noise, 16, 23)  # never trained on
    before = model.score(held_refs, p).mean() - model.score(held_gens, p).mean()
    first = model.update(refs, p, gens, p, steps=10)
    model.version += 1
    for _ in range(4):  # 50 steps in all
        result = model.update(refs, p, gens, p, steps=10)
        model.version += 1
    assert result.loss < 0.1 * first.loss
    assert result.accuracy == 1.0
    assert result.reference_score > result.generated_score
    held_ref, held_gen = model.score(held_refs, p), model.score(held_gens, p)
    # Per prompt, every held-out reference beats every held-out generation.
    for prompt in (CAT, DOG):
        rows = [i for i, q in enumerate(p) if q == prompt]
        assert held_ref[rows].min() > held_gen[rows].max()
    # Rewards are logit_scale.exp() * cos / 26 (about ±0.55 for the tiny CLIP): 0.15 is clear.
    margin = held_ref.mean() - held_gen.mean()
    assert margin > 0.15 and margin > before + 0.15


def test_update_reports_pairwise_accuracy_and_scores():
    model = make()
    refs, gens = batch(smooth, 3, 14), batch(noise, 2, 15)
    ref_p, gen_p = [CAT, CAT, DOG], [CAT, DOG]
    result = model.update(refs, ref_p, gens, gen_p, steps=2)
    s_ref, s_gen = model.score(refs, ref_p), model.score(gens, gen_p)
    assert result.reference_score == pytest.approx(float(s_ref.mean()), abs=1e-5)
    assert result.generated_score == pytest.approx(float(s_gen.mean()), abs=1e-5)
    pairs = [(r, g) for r in range(3) for g in range(2) if ref_p[r] == gen_p[g]]
    want = sum(s_ref[r] > s_gen[g] for r, g in pairs) / len(pairs)
    assert result.accuracy == pytest.approx(want)


def test_not_trainable():
    model = make(trainable=False)
    assert model.trainable is False
    assert not any(p.requires_grad for p in model.model.parameters())
    with pytest.raises(FailedPrecondition):
        model.update(batch(smooth, 1, 0), [CAT], batch(noise, 1, 1), [CAT], steps=1)
    # It still serves weights trained elsewhere (same architecture, no optimizer).
    trained = make()
    trained.update(batch(smooth, 2, 0), prompts(2), batch(noise, 2, 1), prompts(2), steps=2)
    model.import_state(*trained.export_state())
    probe = batch(noise, 2, 3)
    assert np.array_equal(model.score(probe, prompts(2)), trained.score(probe, prompts(2)))
    tensors, _ = model.export_state()
    assert not any(k.startswith("optim.") for k in tensors)


# ---------------------------------------------------------------------------------------------
# State


def test_export_import_round_trip_through_safetensors(tmp_path):
    refs, gens = batch(smooth, 4, 16), batch(noise, 4, 17)
    probe, probe_p = batch(smooth, 2, 18) + batch(noise, 2, 19), prompts(4)
    a = make()
    for _ in range(2):
        a.update(refs, prompts(4), gens, prompts(4), steps=3)
        a.version += 1
    tensors, metadata = a.export_state()
    assert all(k.startswith(("param.vision_model.encoder.layers.1.", "optim.")) for k in tensors)
    store = StateStore(tmp_path)
    store.save("pickscore", tensors, metadata)
    b = make()
    b.import_state(*store.load("pickscore"))
    b.version = a.version
    assert np.array_equal(b.score(probe, probe_p), a.score(probe, probe_p))
    ra = a.update(refs, prompts(4), gens, prompts(4), steps=3)
    rb = b.update(refs, prompts(4), gens, prompts(4), steps=3)
    assert ra == rb
    assert np.array_equal(b.score(probe, probe_p), a.score(probe, probe_p))


def test_import_rolls_back_an_update():
    refs, gens = batch(smooth, 2, 20), batch(noise, 2, 21)
    model = make()
    snapshot = model.export_state()
    before = model.score(refs, prompts(2))
    first = model.update(refs, prompts(2), gens, prompts(2), steps=2)
    model.import_state(*snapshot)
    assert np.array_equal(model.score(refs, prompts(2)), before)
    assert model.update(refs, prompts(2), gens, prompts(2), steps=2) == first


def test_state_of_another_architecture_is_refused():
    model = make()
    other = make(trainable_blocks=2)
    assert model.fingerprint() != other.fingerprint()
    with pytest.raises(ValueError, match="state is for"):
        model.import_state(*other.export_state())
    tensors, _ = make(seed=1).export_state()
    tensors.pop(next(iter(tensors)))
    with pytest.raises(ValueError, match="param.vision_model"):
        model.import_state(tensors, {})
