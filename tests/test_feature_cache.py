"""The feature cache: LRU by bytes, the DINO discriminator with and without it (bit-identical),
backbone calls it saves, and its counters on a real server's /metrics."""

from __future__ import annotations

import re

import blake3
import httpx
import numpy as np
import pytest
import torch
import yaml

from advgrpo.client import Group, RewardClient
from advgrpo.common.errors import ConfigError
from advgrpo.reward_server.config import PRESETS, DinoParams, load_config
from advgrpo.reward_server.feature_cache import FeatureCache
from advgrpo.reward_server.models.base import content_digest, content_seed, digest_seeds
from advgrpo.reward_server.models.dino import DinoDiscriminator

from .conftest import noise_image, smooth_image

TINY_DINO = dict(backbone="tiny", image_size=56, head_hidden=64, num_patches=8, lr=3e-2)
ENTRY_BYTES = 17 * 32 * 4  # tiny DINOv2 at 56 px: [1 + 4x4 patches, 32] float32
# Bit-identity rests on the backbone being batch-invariant on the device: checked on a GPU too
# when the tests run on a machine with one.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def make(cache_bytes: int, device: str = "cpu", recent_bytes: int = 0) -> DinoDiscriminator:
    params = DinoParams(**TINY_DINO, feature_cache_bytes=cache_bytes, recent_feature_cache_bytes=recent_bytes)
    return DinoDiscriminator("dino", params, device=device)


def images(fn, n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [fn(rng) for _ in range(n)]


def blank(n: int) -> list[str]:
    return [""] * n


def count_backbone_images(model: DinoDiscriminator) -> list[int]:
    """Wraps the model's backbone: the returned list gets each forward call's batch size."""
    seen: list[int] = []
    forward = model.backbone.forward

    def counting_forward(*args, pixel_values, **kwargs):
        seen.append(int(pixel_values.shape[0]))
        return forward(*args, pixel_values=pixel_values, **kwargs)

    model.backbone.forward = counting_forward
    return seen


def t(n_floats: int, fill: float = 0.0) -> torch.Tensor:
    return torch.full((n_floats,), fill, dtype=torch.float32)  # 4 bytes per element


# ---------------------------------------------------------------- the cache alone


def test_lru_eviction_by_bytes_and_counters():
    cache = FeatureCache(max_bytes=100)
    assert cache.enabled
    assert cache.put(b"a", t(10, 1)) and cache.put(b"b", t(10, 2))  # 40 + 40 bytes
    assert cache.stats().bytes == 80 and len(cache) == 2
    assert cache.get(b"a")[0] == 1  # hit: "a" is now the most recent, "b" the least
    assert cache.get(b"zz") is None  # miss
    assert cache.put(b"c", t(5, 3))  # 100 bytes: fits exactly, nothing evicted
    assert cache.stats().evictions == 0 and cache.stats().bytes == 100
    assert cache.put(b"d", t(10, 4))  # needs 40: evicts "b", the least recently used
    assert b"b" not in cache and all(k in cache for k in (b"a", b"c", b"d"))
    s = cache.stats()
    assert (s.hits, s.misses, s.evictions, s.bytes, s.entries, s.max_bytes) == (1, 1, 1, 100, 3, 100)
    assert cache.put(b"e", t(15, 5))  # needs 60: evicts "a", then "c"
    assert [k for k in (b"a", b"c", b"d", b"e") if k in cache] == [b"d", b"e"]
    assert cache.stats().evictions == 3 and cache.stats().bytes == 100
    # Replacing a key's value is not an eviction, and the bytes follow the new value.
    assert cache.put(b"d", t(1, 6))
    assert cache.stats().evictions == 3 and cache.stats().bytes == 64 and cache.get(b"d")[0] == 6
    # An entry larger than the budget is not cached, and drops the key's old value.
    assert not cache.put(b"d", t(26))
    assert b"d" not in cache and cache.stats().bytes == 60 and cache.stats().evictions == 3
    assert cache.stats().as_dict("x_") == {"x_hits": 2, "x_misses": 1, "x_evictions": 3, "x_bytes": 60, "x_entries": 1}
    cache.clear()
    assert len(cache) == 0 and cache.stats().bytes == 0 and cache.stats().hits == 2


def test_recency_decides_what_goes():
    cache = FeatureCache(max_bytes=3 * 40)
    for key in (b"1", b"2", b"3"):
        cache.put(key, t(10))
    cache.get(b"1")
    cache.put(b"2", t(10))  # re-inserting refreshes too
    cache.put(b"4", t(10))  # the least recently used is "3"
    assert [k for k in (b"1", b"2", b"3", b"4") if k in cache] == [b"1", b"2", b"4"]


def test_put_stores_an_owned_copy():
    cache = FeatureCache(max_bytes=1 << 20)
    batch = torch.arange(12.0).view(3, 4)
    cache.put(b"row", batch[1])
    batch.zero_()  # the caller reuses its buffer: the entry is unaffected
    stored = cache.get(b"row")
    assert stored.tolist() == [4.0, 5.0, 6.0, 7.0]
    assert stored.untyped_storage().nbytes() == 16  # does not pin the whole batch


def test_disabled_cache_stores_and_counts_nothing():
    cache = FeatureCache(0)
    assert not cache.enabled
    assert not cache.put(b"a", t(1))
    assert cache.get(b"a") is None
    assert cache.stats().as_dict() == {"hits": 0, "misses": 0, "evictions": 0, "bytes": 0, "entries": 0}
    with pytest.raises(ValueError):
        FeatureCache(-1)


def test_content_digest_names_content():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (6, 10, 3), dtype=np.uint8)
    assert content_digest(img) == content_digest(np.asfortranarray(img)) == content_digest(img.copy())
    assert len(content_digest(img)) == 16
    assert content_digest(img.reshape(10, 6, 3)) != content_digest(img)  # same bytes, other shape
    other = img.copy()
    other[0, 0, 0] ^= 1
    assert content_digest(other) != content_digest(img)
    # The digest is BLAKE3 over pixels, shape and ndim; the patch seed comes from the digest and a salt.
    h = blake3.blake3(img.tobytes() + np.asarray(img.shape, dtype="<i8").tobytes() + bytes([img.ndim]))
    assert content_digest(img) == h.digest(16)
    assert [content_seed(img, 7)] == digest_seeds([content_digest(img)], 7)
    assert content_seed(img, 7) != content_seed(img, 8) and 0 <= content_seed(img, 7) < 1 << 63
    assert len(set(digest_seeds([bytes([i]) * 16 for i in range(16)] * 4, 0))) == 16
    assert (
        len({s for salt in (-1, 0, 1, 2**40) for s in digest_seeds([bytes([i]) * 16 for i in range(16)], salt)}) == 64
    )


def test_config_field_is_validated():
    assert DinoParams().feature_cache_bytes == 1 << 30
    tiny = load_config("tiny").model("dino").params
    assert tiny.feature_cache_bytes == PRESETS["tiny"]["models"]["dino"]["params"]["feature_cache_bytes"]
    off = {"models": {"dino": {"params": {"feature_cache_bytes": 0}}}}
    assert load_config("tiny", overrides=off).model("dino").params.feature_cache_bytes == 0
    bad = {"models": {"dino": {"params": {"feature_cache_bytes": -1}}}}
    with pytest.raises(ConfigError, match="feature_cache_bytes"):
        load_config("tiny", overrides=bad)


# ---------------------------------------------------------------- the discriminator


@pytest.mark.parametrize("device", DEVICES)
def test_backbone_tokens_do_not_depend_on_the_batch(device):
    """The premise of the cache: an image's tokens are the same bits in any batch, at any position."""
    model = make(0, device)
    imgs = images(noise_image, 40, 1) + images(smooth_image, 8, 2)
    full = model._backbone_features(imgs)  # chunks of 32 and 16
    alone = torch.cat([model._backbone_features([img]) for img in imgs])
    assert torch.equal(alone, full)
    for size in (3, 7, 13, 32):
        parts = torch.cat([model._backbone_features(imgs[i : i + size]) for i in range(0, len(imgs), size)])
        assert torch.equal(parts, full), size
    order = np.random.default_rng(3).permutation(len(imgs))
    assert torch.equal(model._backbone_features([imgs[i] for i in order]), full[torch.from_numpy(order).to(device)])


@pytest.mark.parametrize("device", DEVICES)
def test_cache_changes_no_result(device):
    """Scores, update results, head weights and Adam state: bit-identical with and without the cache,
    also when the cache is too small for the references and keeps evicting."""
    plain, cached, tight = make(0, device), make(1 << 20, device), make(5 * ENTRY_BYTES, device)
    models = (plain, cached, tight)
    refs = images(smooth_image, 12, 10)
    probe = images(noise_image, 3, 11) + refs[:3]
    for epoch in range(5):
        # The same references again and again: another subset, order and company each time,
        # a duplicate, and fresh generations.
        order = np.random.default_rng(epoch).permutation(len(refs))[: 8 + epoch % 3]
        batch_refs = [refs[i] for i in order] + [refs[order[0]]]
        gens = images(noise_image, 6 + epoch, 100 + epoch)
        scored = [m.score(gens + batch_refs[:4], blank(len(gens) + 4)) for m in models]
        results = [m.update(batch_refs, blank(len(batch_refs)), gens, blank(len(gens)), steps=2) for m in models]
        for m in models:
            m.version += 1
        for s, r in zip(scored[1:], results[1:], strict=True):
            assert np.array_equal(s, scored[0])
            assert r == results[0]  # loss, scores and accuracy: exact floats
        for m in models[1:]:
            want, got = plain.export_state()[0], m.export_state()[0]
            assert want.keys() == got.keys()
            assert all(torch.equal(want[k], got[k]) for k in want)
    final = [m.score(probe, blank(len(probe))) for m in models]
    assert np.array_equal(final[1], final[0]) and np.array_equal(final[2], final[0])
    assert cached.stats()["feature_cache_hits"] > 0 and cached.stats()["feature_cache_evictions"] == 0
    assert tight.stats()["feature_cache_evictions"] > 0 and tight.stats()["feature_cache_entries"] == 5
    assert plain.stats()["feature_cache_misses"] == 0  # disabled: not even looked up


def test_repeated_references_skip_the_backbone():
    model = make(1 << 20)
    seen = count_backbone_images(model)
    refs = images(smooth_image, 8, 20)

    def update(seed: int):
        seen.clear()
        model.update(refs, blank(8), images(noise_image, 8, seed), blank(8), steps=1)
        model.version += 1
        return sum(seen)

    assert update(1) == 16  # cold: references and generations
    assert model.stats()["feature_cache_entries"] == 8  # the references, not the generations
    assert model.stats()["feature_cache_bytes"] == 8 * ENTRY_BYTES
    assert update(2) == 8  # warm: the generations only
    assert update(3) == 8
    seen.clear()
    model.score(refs[::-1], blank(8))  # scoring references: all hits, no backbone call
    assert seen == []
    model.score(images(noise_image, 4, 4) + refs[:2], blank(6))  # misses only
    assert seen == [1, 1, 1, 1]  # on the CPU the backbone runs each image on its own
    s = model.stats()
    assert (s["feature_cache_hits"], s["feature_cache_misses"]) == (8 + 8 + 8 + 2, 16 + 8 + 8 + 4)


def test_scored_generations_make_the_next_update_skip_the_backbone():
    """The trainer's flow: it scores its generations, then sends them (and references) to
    UpdateDiscriminator. With the recent pool, that update runs no backbone at all, and every
    result equals the uncached model's."""
    plain, cached = make(0), make(1 << 20, recent_bytes=1 << 20)
    seen = count_backbone_images(cached)
    refs = images(smooth_image, 6, 30)
    for epoch in range(3):
        gens = images(noise_image, 6, 100 + epoch)
        scores = [m.score(gens, blank(6)) for m in (plain, cached)]
        assert np.array_equal(scores[0], scores[1])
        seen.clear()
        results = [m.update(refs, blank(6), gens, blank(6), steps=2) for m in (plain, cached)]
        assert results[0] == results[1]
        assert sum(seen) == (6 if epoch == 0 else 0)  # only the first epoch's references are new
        for m in (plain, cached):
            m.version += 1
    assert cached.stats()["feature_cache_entries"] == 6 + 3 * 6  # references + recent generations


def test_cache_counters_on_a_real_servers_metrics(start_server, tmp_path):
    config = tmp_path / "dino.yaml"
    params = {**TINY_DINO, "feature_cache_bytes": 1 << 20}
    config.write_text(yaml.safe_dump({"models": {"dino": {"kind": "dino", "weight": 1.0, "params": params}}}))
    server = start_server("--config", str(config), "--device", "cpu")
    refs = [Group("a cat", images(smooth_image, 4, 30), "r0")]
    with RewardClient(server.target, timeout_s=60) as client, httpx.Client(base_url=server.http, timeout=30) as http:
        client.wait_ready(60)

        def metric(name: str) -> float:
            m = re.search(rf'^{name}{{model="dino"}} (\S+)$', http.get("/metrics").text, re.M)
            assert m, name
            return float(m.group(1))

        assert metric("advgrpo_feature_cache_hits_total") == 0  # exported from the start
        for seed in (31, 32):
            client.update_discriminator("dino", refs, [Group("a cat", images(noise_image, 4, seed), "g0")])
        client.score(refs, {"dino": 1.0})
        # Warm-up (1 miss); update 1 (8 misses); update 2 (4 hits, 4 misses); scoring the refs (4 hits).
        assert metric("advgrpo_feature_cache_hits_total") == 8
        assert metric("advgrpo_feature_cache_misses_total") == 13
        assert metric("advgrpo_feature_cache_evictions_total") == 0
        # The 4 references, and the warm-up image in the pool of recently scored images.
        assert metric("advgrpo_feature_cache_entries") == 5
        assert metric("advgrpo_feature_cache_bytes") == 5 * ENTRY_BYTES
