"""DinoDiscriminator on a tiny random DINOv2: the pure math, determinism, learning and state.

In-process, no gRPC. The tiny backbone is built in memory (no downloads); a test also saves it
with save_pretrained and loads it back by path, the code path of real checkpoints.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from advgrpo.common import tiny_models
from advgrpo.common.errors import InvalidArgument
from advgrpo.reward_server.config import DinoParams, ModelConfig
from advgrpo.reward_server.models import build_model
from advgrpo.reward_server.models.base import content_seed
from advgrpo.reward_server.models.dino import (
    DinoDiscriminator,
    build_head,
    discriminator_loss,
    head_scores,
    hinge_loss,
    sample_patch_index,
    transform_tokens,
)
from advgrpo.reward_server.state import StateStore

SIZE = 64  # input images; the tiny backbone resizes them to 56 (4x4 patches of 14 px)


def params(**overrides) -> DinoParams:
    base = dict(backbone="tiny", image_size=56, head_hidden=64, num_patches=8, lr=1e-2)
    base.update(overrides)
    return DinoParams(**base)


def make(**overrides) -> DinoDiscriminator:
    return DinoDiscriminator("dino", params(**overrides), device="cpu")


def smooth(rng: np.random.Generator) -> np.ndarray:
    """A "reference": a random flat colour under a gentle linear gradient of random direction."""
    colour = rng.uniform(30, 230, size=3)
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    ramp = 0.85 + 0.15 * (np.cos(angle) * xx + np.sin(angle) * yy)
    return np.clip(colour * ramp[..., None], 0, 255).astype(np.uint8)


def noise(rng: np.random.Generator) -> np.ndarray:
    """A "generation": uniform noise."""
    return rng.integers(0, 256, size=(SIZE, SIZE, 3), dtype=np.uint8)


def batch(fn, n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [fn(rng) for _ in range(n)]


def blank(n: int) -> list[str]:
    return [""] * n


# ---------------------------------------------------------------------------------------------
# Pure math


def test_sample_patch_index_distinct_bounded_and_per_row():
    seeds = [content_seed(img) for img in batch(noise, 40, 0)]
    idx = sample_patch_index(seeds, n_patches=16, k=8)
    assert idx.shape == (40, 8) and idx.dtype == torch.long
    assert int(idx.min()) >= 0 and int(idx.max()) < 16
    for row in idx:
        assert len(set(row.tolist())) == 8  # without replacement
    # A row depends only on its own seed: batch composition does not matter.
    assert torch.equal(sample_patch_index(seeds[5:6], 16, 8)[0], idx[5])
    assert torch.equal(sample_patch_index(seeds[::-1], 16, 8).flip(0), idx)
    # Different seeds give different samples (overwhelmingly likely for 40 rows).
    assert len({tuple(r) for r in idx.tolist()}) > 30
    # K = N is a permutation, and every K takes its first K entries (the K smallest keys).
    full = sample_patch_index(seeds, 16, 16)
    assert all(sorted(r) == list(range(16)) for r in full.tolist())
    assert torch.equal(full[:, :8], idx)
    # Roughly uniform: each patch is picked about K/N of the time over many seeds.
    counts = torch.bincount(sample_patch_index(range(4000), 16, 4).flatten(), minlength=16)
    assert int(counts.min()) > 850 and int(counts.max()) < 1150  # expected 1000 each
    with pytest.raises(ValueError):
        sample_patch_index(seeds, 16, 17)
    assert sample_patch_index([], 16, 8).shape == (0, 8)


def test_hinge_loss_hand_computed():
    ref = torch.tensor([2.0, 0.5, -1.0])
    gen = torch.tensor([-2.0, 0.0, 0.5])
    # relu(1 - ref) = [0, .5, 2] -> mean 5/6; relu(1 + gen) = [0, 1, 1.5] -> mean 5/6.
    assert hinge_loss(ref, gen).item() == pytest.approx(0.5 * (5 / 6 + 5 / 6))
    ref_p = torch.tensor([[1.5, 0.0], [0.2, -0.4]])  # relu(1 - x) = [0, 1, .8, 1.4] -> .8
    gen_p = torch.tensor([[-1.5, 0.3], [0.0, -0.9]])  # relu(1 + x) = [0, 1.3, 1, .1] -> .6
    want = 0.5 * (5 / 6 + 5 / 6) + 0.3 * 0.5 * (0.8 + 0.6)
    assert discriminator_loss(ref, ref_p, gen, gen_p, 0.3).item() == pytest.approx(want)


def test_head_scores_match_a_loop():
    g = torch.Generator().manual_seed(1)
    tokens = torch.randn(3, 1 + 16, 32, generator=g)
    index = sample_patch_index([1, 2, 3], 16, 5)
    head = build_head(32, 64, seed=0)
    cls_logit, patch_logit, reward = head_scores(tokens, index, head, cls_weight=0.7)
    for b in range(3):
        want_cls = head(tokens[b, 0]).item()
        want_patch = [head(tokens[b, 1 + int(k)]).item() for k in index[b]]
        assert cls_logit[b].item() == pytest.approx(want_cls, abs=1e-6)
        assert patch_logit[b].tolist() == pytest.approx(want_patch, abs=1e-6)
        assert reward[b].item() == pytest.approx(0.7 * want_cls + 0.3 * np.mean(want_patch), abs=1e-6)
    # Exact GELU, not the tanh approximation.
    assert head[1].approximate == "none"


def test_head_init_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, b, c = build_head(32, 64, seed=7), build_head(32, 64, seed=7), build_head(32, 64, seed=8)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert not torch.equal(a[0].weight, c[0].weight)


def test_transform_tokens():
    x = torch.randn(2, 5, 8) * 10
    assert torch.allclose(transform_tokens(x, "l2").norm(dim=-1), torch.ones(2, 5))
    assert transform_tokens(x, "none") is x
    with pytest.raises(ValueError):
        transform_tokens(x, "bogus")


# ---------------------------------------------------------------------------------------------
# Scoring


def test_scores_are_deterministic_and_batch_independent():
    model = make()
    imgs = batch(noise, 3, 1) + batch(smooth, 3, 2)
    first = model.score(imgs, blank(6))
    assert first.shape == (6,) and first.dtype == np.float32
    assert np.array_equal(model.score(imgs, blank(6)), first)
    # The same image, alone or in another batch, in another order: the same reward, bit for bit.
    alone = np.array([model.score([img], blank(1))[0] for img in imgs])
    assert np.array_equal(alone, first)
    assert np.array_equal(model.score(imgs[::-1], blank(6))[::-1], first)
    # A copy in another memory layout is the same image (content seed over the pixels).
    copy = np.asfortranarray(imgs[0])
    np.testing.assert_allclose(model.score([copy], blank(1)), alone[:1], rtol=0, atol=0)
    # The global RNG plays no part.
    torch.manual_seed(999)
    np.random.seed(999)
    assert np.array_equal(model.score(imgs, blank(6)), first)
    # A separately built model with the same seed: bit-identical backbone and head.
    assert np.array_equal(make().score(imgs, blank(6)), first)
    assert not np.allclose(make(seed=1).score(imgs, blank(6)), first)
    model.warmup()


def test_a_trained_head_scores_an_image_alike_in_any_batch():
    """The batcher merges requests into batches of any size: after updates (a trained head),
    each image's reward is still the same bit for bit, whatever batch and position it has."""
    model = make()
    model.update(batch(smooth, 4, 3), blank(4), batch(noise, 4, 4), blank(4), steps=3)
    imgs = batch(noise, 9, 5) + batch(smooth, 9, 6)
    alone = np.array([model.score([img], blank(1))[0] for img in imgs])
    rng = np.random.default_rng(0)
    for size in range(2, len(imgs) + 1):
        for _ in range(4):
            picks = rng.choice(len(imgs), size, replace=False)
            got = model.score([imgs[i] for i in picks], blank(size))
            assert np.array_equal(got, alone[picks]), f"batch of {size}"


# Odd widths: D = 33 puts every other image's head rows off a 16-byte boundary in a batch.
ODD = dict(hidden_size=33, num_heads=3, head_hidden=17, num_patches=5)


@pytest.mark.parametrize("dims", [{}, ODD], ids=["tiny", "d33"])
@pytest.mark.parametrize("threads", [1, 2, 5])
def test_rewards_do_not_depend_on_the_batch_with_the_cache_off(threads, dims, monkeypatch):
    """With the feature cache off every score runs the backbone: an image's reward is the same bit
    for bit alone and in batches of any size, at any position, with 1, 2 or 5 threads."""
    dims = dict(dims)
    width = {k: dims.pop(k) for k in ("hidden_size", "num_heads") if k in dims}
    monkeypatch.setattr(tiny_models, "tiny_dinov2", functools.partial(tiny_models.tiny_dinov2, **width))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = make(feature_cache_bytes=0, recent_feature_cache_bytes=0, **dims)
        assert model.dim == width.get("hidden_size", 32)
        model.update(batch(smooth, 3, 3), blank(3), batch(noise, 3, 4), blank(3), steps=2)  # a trained head
        imgs = batch(noise, 6, 5) + batch(smooth, 5, 6)
        alone = np.array([model.score([img], blank(1))[0] for img in imgs])
        n = len(imgs)
        assert np.array_equal(model.score(imgs, blank(n)), alone)
        for size in (2, 3, 5, 8):
            for start in sorted({0, 1, (n - size) // 2, n - size}):
                got = model.score(imgs[start : start + size], blank(size))
                assert np.array_equal(got, alone[start : start + size]), f"{size} images from {start}"
        order = np.random.default_rng(threads).permutation(n)
        picks = np.concatenate([order, order[:3]])  # shuffled, with duplicates
        assert np.array_equal(model.score([imgs[i] for i in picks], blank(len(picks))), alone[picks])
    finally:
        torch.set_num_threads(before)


def test_patches_are_capped_at_the_token_count():
    model = make(num_patches=100)
    assert model.n_patches == 16 and model.k == 16
    out = model.score(batch(noise, 2, 3), blank(2))
    assert out.shape == (2,) and np.isfinite(out).all()


def test_score_validates_images():
    model = make()
    assert model.score([], []).shape == (0,)
    with pytest.raises(InvalidArgument, match=r"images\[1\]"):
        model.score([noise(np.random.default_rng(0)), np.zeros((8, 8), np.uint8)], blank(2))
    with pytest.raises(InvalidArgument, match=r"images\[0\]"):
        model.score([np.zeros((8, 8, 3), np.float32)], blank(1))


def test_l2_transform_is_used_for_scoring_and_training():
    """With "l2", scaling the backbone's tokens changes nothing, in scoring and in training."""
    refs, gens = batch(smooth, 4, 4), batch(noise, 4, 5)

    def run(transform: str, scale: float):
        model = make(feature_transform=transform)
        inner = model.backbone.forward

        def scaled_forward(*args, **kwargs):
            out = inner(*args, **kwargs)
            out.last_hidden_state = out.last_hidden_state * scale
            return out

        model.backbone.forward = scaled_forward
        scores = model.score(refs + gens, blank(8))
        result = model.update(refs, blank(4), gens, blank(4), steps=3)
        return scores, result

    s1, r1 = run("l2", 1.0)
    s5, r5 = run("l2", 5.0)
    np.testing.assert_allclose(s5, s1, atol=1e-5)
    assert r5.loss == pytest.approx(r1.loss, abs=1e-5)
    assert r5.reference_score == pytest.approx(r1.reference_score, abs=1e-5)
    n1, q1 = run("none", 1.0)
    n5, q5 = run("none", 5.0)
    assert not np.allclose(n5, n1, atol=1e-3)
    assert q5.loss != pytest.approx(q1.loss, abs=1e-4)


def test_loads_a_saved_backbone_by_path(tmp_path):
    from advgrpo.common.tiny_models import tiny_dinov2

    tiny_dinov2(56, seed=0).save_pretrained(tmp_path / "dinov2")
    by_path = make(backbone=str(tmp_path / "dinov2"))
    imgs = batch(noise, 2, 6)
    np.testing.assert_allclose(by_path.score(imgs, blank(2)), make().score(imgs, blank(2)), atol=1e-6)
    assert str(tmp_path / "dinov2") in by_path.fingerprint()


def test_build_model_makes_a_dino():
    cfg = ModelConfig(name="d", kind="dino", params=params())
    model = build_model(cfg, device="cpu")
    assert isinstance(model, DinoDiscriminator) and model.trainable and model.kind == "dino"


# ---------------------------------------------------------------------------------------------
# Training


def test_update_rejects_unusable_batches():
    model = make()
    refs, gens = batch(smooth, 2, 0), batch(noise, 2, 1)
    with pytest.raises(InvalidArgument, match="no references"):
        model.update([], [], gens, blank(2), steps=1)
    with pytest.raises(InvalidArgument, match="no generated images"):
        model.update(refs, blank(2), [], [], steps=1)
    with pytest.raises(InvalidArgument, match="steps"):
        model.update(refs, blank(2), gens, blank(2), steps=0)
    with pytest.raises(InvalidArgument, match=r"generated\[0\]"):
        model.update(refs, blank(2), [np.zeros((4, 4, 3), np.int32)], blank(1), steps=1)
    with pytest.raises(InvalidArgument, match="reference_prompts"):
        model.update(refs, blank(1), gens, blank(2), steps=1)


def test_update_is_deterministic_and_leaves_version_alone():
    refs, gens = batch(smooth, 4, 7), batch(noise, 4, 8)
    a, b = make(), make()
    torch.manual_seed(1)
    ra = a.update(refs, blank(4), gens, blank(4), steps=5)
    torch.manual_seed(2)  # the global RNG plays no part
    rb = b.update(refs, blank(4), gens, blank(4), steps=5)
    assert ra == rb
    assert a.version == 0
    assert np.array_equal(a.score(refs, blank(4)), b.score(refs, blank(4)))
    # Training patches depend on the version: the same batch at another version samples others.
    c, d = make(), make()
    d.version = 1
    rc = c.update(refs, blank(4), gens, blank(4), steps=1)
    rd = d.update(refs, blank(4), gens, blank(4), steps=1)
    assert rc.loss != rd.loss


def test_head_learns_references_from_generations():
    model = make(lr=3e-2)  # the tiny preset's features are weak; a larger lr learns in 60 steps
    refs, gens = batch(smooth, 16, 10), batch(noise, 16, 11)
    held_refs, held_gens = batch(smooth, 16, 20), batch(noise, 16, 21)  # never trained on
    before = model.score(held_refs, blank(16)).mean() - model.score(held_gens, blank(16)).mean()
    losses = []
    for _ in range(6):  # 60 Adam steps in 6 updates, as the host would run them
        result = model.update(refs, blank(16), gens, blank(16), steps=10)
        model.version += 1
        losses.append(result.loss)
    assert losses[-1] < 0.5 * losses[0]
    assert result.accuracy >= 0.9
    assert result.reference_score > 0 > result.generated_score
    held_ref, held_gen = model.score(held_refs, blank(16)), model.score(held_gens, blank(16))
    margin = held_ref.mean() - held_gen.mean()
    assert margin > 2.0 and margin > before + 2.0
    # Nearly every held-out (reference, generation) pair is ordered correctly (ROC AUC).
    assert (held_ref[:, None] > held_gen[None, :]).mean() >= 0.9


def test_update_reports_scoring_path_rewards():
    model = make()
    refs, gens = batch(smooth, 3, 12), batch(noise, 5, 13)
    result = model.update(refs, blank(3), gens, blank(5), steps=2)
    ref_scores, gen_scores = model.score(refs, blank(3)), model.score(gens, blank(5))
    assert result.reference_score == pytest.approx(float(ref_scores.mean()), abs=1e-6)
    assert result.generated_score == pytest.approx(float(gen_scores.mean()), abs=1e-6)
    want_acc = (int((ref_scores > 0).sum()) + int((gen_scores < 0).sum())) / 8
    assert result.accuracy == pytest.approx(want_acc)


# ---------------------------------------------------------------------------------------------
# State


def test_export_import_round_trip_through_safetensors(tmp_path):
    refs, gens = batch(smooth, 4, 14), batch(noise, 4, 15)
    probe = batch(smooth, 2, 16) + batch(noise, 2, 17)
    a = make()
    for _ in range(2):
        a.update(refs, blank(4), gens, blank(4), steps=4)
        a.version += 1
    tensors, metadata = a.export_state()
    assert any(k.startswith("head.") for k in tensors) and any(k.startswith("optim.") for k in tensors)
    store = StateStore(tmp_path)
    store.save("dino", tensors, metadata)
    loaded_tensors, loaded_meta = store.load("dino")

    b = make()
    b.import_state(loaded_tensors, loaded_meta)
    b.version = a.version  # the host restores the version
    assert np.array_equal(b.score(probe, blank(4)), a.score(probe, blank(4)))
    # The next update continues identically (Adam moments and step count restored).
    ra = a.update(refs, blank(4), gens, blank(4), steps=3)
    rb = b.update(refs, blank(4), gens, blank(4), steps=3)
    assert ra == rb
    assert np.array_equal(b.score(probe, blank(4)), a.score(probe, blank(4)))


def test_import_rolls_back_an_update():
    refs, gens = batch(smooth, 3, 18), batch(noise, 3, 19)
    model = make()
    model.update(refs, blank(3), gens, blank(3), steps=2)
    snapshot = model.export_state()
    before = model.score(refs, blank(3))
    first = model.update(refs, blank(3), gens, blank(3), steps=2)
    model.import_state(*snapshot)  # a failed update is rolled back
    assert np.array_equal(model.score(refs, blank(3)), before)
    # The snapshot was not mutated by the update, so replaying gives the same result twice.
    assert model.update(refs, blank(3), gens, blank(3), steps=2) == first
    model.import_state(*snapshot)
    assert model.update(refs, blank(3), gens, blank(3), steps=2) == first


def test_state_of_another_architecture_is_refused():
    small = make(head_hidden=32)
    model = make()
    assert small.fingerprint() != model.fingerprint()
    assert "dino" in model.fingerprint() and "D=32" in model.fingerprint()
    tensors, metadata = small.export_state()
    with pytest.raises(ValueError, match="state is for"):
        model.import_state(tensors, metadata)
    with pytest.raises(ValueError, match="head.0.weight"):  # no fingerprint: shapes still checked
        model.import_state(tensors, {})
    assert make(feature_transform="none").fingerprint() != model.fingerprint()


def test_learning_does_not_touch_the_backbone():
    model = make()
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    assert not any(p.requires_grad for p in model.backbone.parameters())
    model.update(batch(smooth, 2, 0), blank(2), batch(noise, 2, 1), blank(2), steps=3)
    after = model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_features_are_l2_normalised():
    model = make()
    tokens = model.features(batch(noise, 2, 0))
    assert tokens.shape == (2, 17, 32)
    torch.testing.assert_close(tokens.norm(dim=-1), torch.ones(2, 17))
    raw = make(feature_transform="none").features(batch(noise, 2, 0))
    torch.testing.assert_close(F.normalize(raw, dim=-1), tokens)


def test_params_are_not_mutated():
    p = params()
    snapshot = dataclasses.asdict(p)
    model = DinoDiscriminator("dino", p)
    model.update(batch(smooth, 2, 0), blank(2), batch(noise, 2, 1), blank(2), steps=1)
    assert dataclasses.asdict(p) == snapshot
