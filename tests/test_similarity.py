"""The dino_similarity model (Adv-GRPO's evaluation metric) over real gRPC: each image's score is its
best cosine match among its group's references (ImageGroup.references / Group.references), which
reach the server with the request, count toward its limits, and leave other models' scores alone."""

from __future__ import annotations

import asyncio
import base64
import os
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import numpy as np
import pytest
import torch

from advgrpo.client import Group, RewardClient
from advgrpo.common.errors import InvalidArgument
from advgrpo.common.shared_memory import SHM_DIR
from advgrpo.reward.v1 import reward_pb2, reward_pb2_grpc
from advgrpo.reward_server import convert
from advgrpo.reward_server.config import load_config
from advgrpo.reward_server.host import ModelHost
from advgrpo.reward_server.models import References
from advgrpo.reward_server.models.dino_similarity import DinoSimilarity

from .conftest import noise_image, smooth_image

pytestmark = pytest.mark.slow

IA = grpc.StatusCode.INVALID_ARGUMENT
RE = grpc.StatusCode.RESOURCE_EXHAUSTED
SIM = {"dino_similarity": 1.0}
# Bit for bit on the CPU (one image per backbone forward); a GPU may round otherwise in its batches.
EXACT = not torch.cuda.is_available()


def same(got, want):
    return got == (want if EXACT else pytest.approx(want, abs=1e-6))


@pytest.fixture(scope="module", autouse=True)
def _built_meanwhile():
    """Builds the direct model (its imports take seconds) while the module's server starts."""
    with ThreadPoolExecutor(1) as pool:
        yield pool.submit(DinoSimilarity, "direct", load_config("tiny").model("dino_similarity").params)


@pytest.fixture(scope="module")
def model(_built_meanwhile):
    """The tiny preset's dino_similarity, built here: what the server computes, directly."""
    return _built_meanwhile.result()


@pytest.fixture(scope="module")
def client(tiny_server):
    with RewardClient(tiny_server.target, timeout_s=60) as c:
        yield c


@pytest.fixture(scope="module")
def stub(tiny_server):
    with grpc.insecure_channel(tiny_server.target) as channel:
        yield reward_pb2_grpc.RewardServiceStub(channel)


def kinds(seed: int, n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(smooth_image if i % 2 else noise_image)(rng, 40 + 8 * (i % 3)) for i in range(n)]


def raw(img: np.ndarray) -> reward_pb2.Image:
    h, w, _ = img.shape
    return reward_pb2.Image(encoding=reward_pb2.ENCODING_RAW_RGB8, height=h, width=w, data=img.tobytes())


def test_a_copy_of_a_reference_scores_one_and_a_score_is_the_best_reference(client, model):
    refs = kinds(1, 3)
    images = [refs[1].copy(), *kinds(2, 3)]
    [s] = client.score([Group("p", images, references=refs)], SIM)
    got = s.components["dino_similarity"]
    assert got[0] == pytest.approx(1.0, abs=1e-5)
    # The model class on the same images, in this process (another process: allow for rounding).
    direct = model.score_against(images, [References(refs)] * len(images)).tolist()
    assert got == pytest.approx(direct, abs=1e-6)
    # The maximum over the references of the cosine of CLS embeddings, computed by hand.
    emb, ref_emb = model.embed(images), torch.stack(model.embed(refs))
    cosines = torch.stack([ref_emb @ e for e in emb])  # [images, references]
    assert got == pytest.approx(cosines.max(dim=1).values.tolist(), abs=1e-6)
    assert s.rewards == pytest.approx(got) and s.model_versions == {"dino_similarity": 0}
    info = {m.name: m for m in client.list_models()}["dino_similarity"]
    assert (info.kind, info.trainable, info.default_weight) == ("dino_similarity", False, 0.0)


def test_scores_do_not_depend_on_the_other_groups_of_the_request(client):
    a = Group("a", kinds(3, 4), "a", references=kinds(4, 2))
    b = Group("b", kinds(5, 5), "b", references=kinds(6, 3))
    c = Group("c", kinds(7, 1), "c", references=kinds(3, 1))  # shares an image with a's
    alone = client.score([a], SIM)[0].components["dino_similarity"]
    for company in ([b, a], [a, c, b], [c, b, a, b]):
        scored = {s.group_id: s.components["dino_similarity"] for s in client.score(company, SIM)}
        assert same(scored["a"], alone), [g.group_id for g in company]


def test_a_group_without_references_is_invalid_argument_naming_it(client, stub):
    request = reward_pb2.ScoreRequest(
        groups=[
            reward_pb2.ImageGroup(
                prompt="p", images=[raw(img) for img in kinds(8, 2)], references=[raw(kinds(9, 1)[0])]
            ),
            reward_pb2.ImageGroup(prompt="q", images=[raw(kinds(10, 1)[0])]),
        ],
        weights={"dino": 1.0, "dino_similarity": 1.0},
    )
    with pytest.raises(grpc.RpcError) as info:
        stub.Score(request, timeout=30)
    assert info.value.code() == IA and "groups[1].references" in info.value.details(), info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        client.score([Group("p", kinds(8, 2))], SIM)
    assert info.value.code() == IA and "groups[0].references" in info.value.details(), info.value.details()


def test_the_default_spec_needs_references_too_and_no_model_runs_before_the_check():
    config = load_config(
        "tiny", overrides={"models": {"dino": None, "pickscore": None, "ocr": None, "dino_similarity": {"weight": 2.0}}}
    )
    host = ModelHost.from_config(config, warmup=False)
    model = host._hosted["dino_similarity"].model
    calls = []
    inner = model.score_against
    model.score_against = lambda *args: calls.append(1) or inner(*args)
    good = reward_pb2.ImageGroup(prompt="p", images=[raw(kinds(11, 1)[0])], references=[raw(kinds(12, 1)[0])])
    bare = reward_pb2.ImageGroup(prompt="p", images=[raw(kinds(13, 1)[0])])

    async def score(*groups):
        return await convert.score(host, reward_pb2.ScoreRequest(groups=list(groups)))  # no weights: the default

    try:
        with pytest.raises(InvalidArgument, match=r"groups\[1\]\.references"):
            asyncio.run(score(good, bare))
        assert calls == [] and host.decoded_bytes.held == 0
        [g] = asyncio.run(score(good)).groups
        assert calls == [1] and list(g.components) == ["dino_similarity"]
        assert g.rewards[0] == pytest.approx(2.0 * g.components["dino_similarity"].values[0])
    finally:
        asyncio.run(host.close())


def test_other_models_score_groups_with_references_unchanged(client):
    images, refs = kinds(14, 3), kinds(15, 2)
    weights = {"dino": 1.0, "pickscore": 0.5}
    [without] = client.score([Group("p", images)], weights)
    [with_refs] = client.score([Group("p", images, references=refs)], weights)
    assert with_refs.components == without.components and with_refs.rewards == without.rewards
    [both] = client.score([Group("p", images, references=refs)], {**weights, **SIM})
    assert {k: both.components[k] for k in weights} == without.components


def test_references_as_png_over_shared_memory_and_over_http_score_as_raw(tiny_server, client):
    images, refs = kinds(16, 3), kinds(17, 2) + [kinds(16, 3)[2]]
    [want] = client.score([Group("p", images, references=refs)], SIM)
    with RewardClient(tiny_server.target, encoding="png") as png:
        [got] = png.score([Group("p", images, references=refs)], SIM)
    assert got.components == want.components and want.components["dino_similarity"][2] == pytest.approx(1, abs=1e-5)
    if SHM_DIR.is_dir():
        with RewardClient(tiny_server.target, shared_memory=True) as shm:
            assert shm.score([Group("p", images, references=refs)], SIM)[0].components == want.components

    def image(img):
        h, w, _ = img.shape
        return {
            "encoding": "ENCODING_RAW_RGB8",
            "height": h,
            "width": w,
            "data": base64.b64encode(img.tobytes()).decode(),
        }

    body = {"groups": [{"prompt": "p", "images": [image(i) for i in images], "references": [image(r) for r in refs]}]}
    r = httpx.post(f"{tiny_server.http}/v1/score", json={**body, "weights": SIM}, timeout=60)
    assert r.status_code == 200, r.text
    values = r.json()["groups"][0]["components"]["dino_similarity"]["values"]  # float32 in shortest form
    assert [float(np.float32(v)) for v in values] == want.components["dino_similarity"]
    del body["groups"][0]["references"]
    r = httpx.post(f"{tiny_server.http}/v1/score", json={**body, "weights": SIM}, timeout=60)
    assert r.status_code == 400 and "groups[0].references" in r.json()["error"], r.text


def test_references_count_toward_the_request_limits(tiny_server, stub):
    dot = raw(np.zeros((1, 1, 3), np.uint8))
    limit = 1024  # server.max_images_per_request

    def request(n_refs, weights, ref=dot):
        return reward_pb2.ScoreRequest(
            groups=[reward_pb2.ImageGroup(prompt="p", images=[dot], references=[ref] * n_refs)], weights=weights
        )

    # Counted whichever models are asked (they are decoded and held like images).
    with pytest.raises(grpc.RpcError) as info:
        stub.Score(request(limit, {"dino": 1.0}), timeout=30)
    assert info.value.code() == RE, info.value.details()
    assert f"{limit + 1} images in one request ({limit} of them references)" in info.value.details()
    assert len(stub.Score(request(limit - 1, {"dino": 1.0}), timeout=30).groups[0].rewards) == 1
    if not SHM_DIR.is_dir():
        return
    # Decoded bytes: 22 references of 4096² named in a sparse segment are over the 1 GiB budget.
    path = SHM_DIR / f"advgrpo-{os.getpid()}-sim-{uuid.uuid4().hex[:8]}"
    side = 4096
    try:
        with open(path, "wb") as f:
            f.truncate(side * side * 3)
        big = reward_pb2.Image(
            encoding=reward_pb2.ENCODING_RAW_RGB8,
            height=side,
            width=side,
            shared_memory=reward_pb2.SharedMemorySlice(name=path.name, size=side * side * 3),
        )
        with pytest.raises(grpc.RpcError) as info:
            stub.Score(request(22, SIM, ref=big), timeout=30)
        assert info.value.code() == RE, info.value.details()
        assert "server.max_request_decoded_bytes" in info.value.details() and str(22 * side * side * 3 + 3) in (
            info.value.details()
        )
    finally:
        path.unlink(missing_ok=True)
    assert tiny_server.proc.poll() is None, tiny_server.log
