"""The HTTP side against a real server process: probes, metrics, the JSON gateway, stats, auth."""

from __future__ import annotations

import base64
import math
import signal
import time

import httpx
import numpy as np
import pytest

from advgrpo.client import Group, RewardClient
from advgrpo.reward_server.web.app import _finite

from .conftest import noise_image, smooth_image

pytestmark = pytest.mark.slow
MODELS = {"dino", "pickscore", "ocr", "dino_similarity"}


@pytest.fixture(scope="module")
def http(tiny_server):
    with httpx.Client(base_url=tiny_server.http, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def client(tiny_server):
    with RewardClient(tiny_server.target, timeout_s=60) as c:
        c.wait_ready(60)
        yield c


def raw_json(img: np.ndarray) -> dict:
    """An Image in the proto3 JSON mapping (enum by name, bytes as base64)."""
    h, w, _ = img.shape
    return {"encoding": "ENCODING_RAW_RGB8", "height": h, "width": w, "data": base64.b64encode(img.tobytes()).decode()}


def group_json(images, prompt: str = "a cat", group_id: str = "g0") -> dict:
    return {"group_id": group_id, "prompt": prompt, "images": [raw_json(i) for i in images]}


def expect_error(response: httpx.Response, status: int, *fragments: str) -> str:
    assert response.status_code == status, response.text
    message = response.json()["error"]
    for fragment in fragments:
        assert fragment in message, message
    return message


# ---------------------------------------------------------------- probes & metrics


def test_healthz(http):
    r = http.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_readyz_lists_models(http):
    r = http.get("/readyz")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ready" and set(body["models"]) == MODELS


def test_metrics_after_grpc_call(http, client):
    client.list_models()  # one RPC through the metrics interceptor
    r = http.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert "# TYPE advgrpo_rpc_requests_total counter" in text
    lines = [line for line in text.splitlines() if line.startswith("advgrpo_rpc_requests_total{")]
    assert any(
        'method="ListModels"' in line and 'code="OK"' in line and float(line.rsplit(" ", 1)[1]) >= 1 for line in lines
    ), lines
    assert 'advgrpo_model_version{model="dino"}' in text
    assert "advgrpo_ready 1.0" in text


# ---------------------------------------------------------------- JSON gateway


def test_models(http):
    r = http.get("/v1/models")
    assert r.status_code == 200
    models = {m["name"]: m for m in r.json()["models"]}
    assert set(models) == MODELS
    assert models["dino"]["kind"] == "dino" and models["dino"]["trainable"] is True
    assert models["dino"]["default_weight"] == 1.0
    # Defaults are printed too (proto3 JSON: uint64 as a string).
    assert models["ocr"]["trainable"] is False and int(models["ocr"]["version"]) == 0


def test_score_matches_grpc(http, client):
    rng = np.random.default_rng(1)
    images = [smooth_image(rng, 40), noise_image(rng, 32), smooth_image(rng, 48)]
    weights = {"dino": 0.5, "pickscore": 2.0}
    r = http.post("/v1/score", json={"groups": [group_json(images, "a cat", "cats")], "weights": weights})
    assert r.status_code == 200, r.text
    (group,) = r.json()["groups"]
    (expected,) = client.score([Group("a cat", images, "cats")], weights)
    assert group["group_id"] == "cats"
    assert group["rewards"] == pytest.approx(expected.rewards, rel=1e-5, abs=1e-6)
    assert set(group["components"]) == set(weights)
    for name in weights:
        assert group["components"][name]["values"] == pytest.approx(expected.components[name], rel=1e-5, abs=1e-6)
        assert int(group["model_versions"][name]) == expected.model_versions[name]


def test_score_with_default_weights(http):
    rng = np.random.default_rng(2)
    r = http.post("/v1/score", json={"groups": [group_json([smooth_image(rng, 32)])]})
    assert r.status_code == 200, r.text
    assert set(r.json()["groups"][0]["components"]) == {"dino"}  # the tiny preset's default spec


@pytest.mark.parametrize(
    "body, fragment",
    [
        (b"{not json", "invalid JSON for advgrpo.reward.v1.ScoreRequest"),
        (b"[1, 2]", "expected an object"),
        (b'{"groups": 3}', "groups"),
        (b'{"no_such_field": 1}', "no_such_field"),
        (b'{"weights": {"dino": "heavy"}}', "heavy"),
        (b"\xff\xfe", "invalid JSON"),
        (b'{"groups": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
        (b'{"weights": ' + b'{"a": ' * 5_000 + b"1" + b"}" * 5_000 + b"}", "invalid JSON"),
    ],
)
def test_score_bad_json_is_400(http, body, fragment):
    r = http.post("/v1/score", content=body, headers={"content-type": "application/json"})
    expect_error(r, 400, fragment)


def test_score_bad_image_names_the_field(http):
    bad = {"encoding": "ENCODING_RAW_RGB8", "height": 8, "width": 8, "data": base64.b64encode(b"\0" * 10).decode()}
    r = http.post("/v1/score", json={"groups": [{"prompt": "a cat", "images": [bad]}]})
    expect_error(r, 400, "groups[0].images[0]")
    png = {"encoding": "ENCODING_PNG", "data": base64.b64encode(b"not a png").decode()}
    good = raw_json(smooth_image(np.random.default_rng(0), 16))
    r = http.post("/v1/score", json={"groups": [{"prompt": "a cat", "images": [good, png]}]})
    expect_error(r, 400, "groups[0].images[1]")


def test_score_empty_request_is_400(http):
    expect_error(http.post("/v1/score", json={}), 400, "groups")


def test_score_unknown_model_is_404(http):
    img = smooth_image(np.random.default_rng(3), 16)
    r = http.post("/v1/score", json={"groups": [group_json([img])], "weights": {"nope": 1.0}})
    expect_error(r, 404, "'nope'")


def test_gateway_is_post_only(http):
    assert http.get("/v1/score").status_code == 405
    assert http.get("/v1/update").status_code == 405


def test_update_errors(http):
    rng = np.random.default_rng(4)
    body = {"references": [group_json([smooth_image(rng, 16)])], "generated": [group_json([noise_image(rng, 16)])]}
    expect_error(http.post("/v1/update", json={**body, "model": "nope"}), 404, "'nope'")
    expect_error(http.post("/v1/update", json={**body, "model": "ocr"}), 409, "not trainable")
    expect_error(http.post("/v1/update", json={"model": "dino"}), 400, "references")


def test_update_then_stats(http):
    rng = np.random.default_rng(5)
    before = {m["name"]: int(m["version"]) for m in http.get("/v1/models").json()["models"]}
    body = {
        "model": "dino",
        "references": [group_json([smooth_image(rng, 32) for _ in range(3)])],
        "generated": [group_json([noise_image(rng, 32) for _ in range(3)])],
        "steps": 2,
        "update_id": "http-update-1",
    }
    r = http.post("/v1/update", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["model"] == "dino" and int(out["version"]) == before["dino"] + 1 and out["replayed"] is False
    assert all(math.isfinite(out[k]) for k in ("loss", "reference_score", "generated_score", "accuracy"))

    # A retry with the same update_id replays the recorded answer, without training again.
    again = http.post("/v1/update", json=body).json()
    assert again["replayed"] is True and again["version"] == out["version"]

    r = http.post("/v1/score", json={"groups": [group_json([smooth_image(rng, 32), noise_image(rng, 32)])]})
    assert r.status_code == 200, r.text

    stats = http.get("/v1/stats")
    assert stats.status_code == 200
    s = stats.json()
    assert s["ready"] is True and s["status"] == "ready" and s["uptime_s"] > 0 and s["auth_required"] is False
    models = {m["name"]: m for m in s["models"]}
    assert set(models) == MODELS
    dino = models["dino"]
    assert dino["version"] == before["dino"] + 1 and dino["trainable"] is True and dino["kind"] == "dino"
    assert dino["updates"] == dino["version"]  # every update of this process is counted once (no replays)
    assert dino["images_scored"] >= 2 and dino["activity"]["images"] >= 2 and dino["activity"]["requests"] >= 1

    updates = [e for e in s["events"] if e["kind"] == "update" and e["model"] == "dino"]
    assert len(updates) == dino["updates"]  # the replay is not an event
    event = updates[-1]["data"]
    assert event["version"] == dino["version"]
    for key in ("loss", "reference_score", "generated_score", "accuracy"):
        assert event[key] == pytest.approx(out[key], rel=1e-5, abs=1e-6)
        assert dino["last_update"][key] == pytest.approx(out[key], rel=1e-5, abs=1e-6)
    assert s["updates"]["dino"][-1]["version"] == dino["version"]

    scores = [e for e in s["events"] if e["kind"] == "score" and e["model"] == "dino"]
    assert scores and scores[-1]["data"]["images"] == 2 and math.isfinite(scores[-1]["data"]["mean"])


def test_dashboard_page_is_served(http):
    r = http.get("/dashboard")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    assert 'id="models"' in page and "v1/stats" in page
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "")  # self-contained: no external assets
    assert "https://" not in page


# ---------------------------------------------------------------- auth


def test_auth_token_guards_the_gateway_only(start_server):
    server = start_server("--preset", "noop", env={"ADVGRPO_AUTH_TOKEN": "tok"})
    img = {"groups": [group_json([smooth_image(np.random.default_rng(6), 8)])]}
    good = {"Authorization": "Bearer tok"}
    with httpx.Client(base_url=server.http, timeout=30) as http:
        # Probes stay open for orchestrators and scrapers; stats and the dashboard change nothing.
        for path in ("/healthz", "/readyz", "/metrics", "/v1/stats", "/dashboard"):
            assert http.get(path).status_code == 200, path
        assert http.get("/v1/stats").json()["auth_required"] is True

        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic tok"}, {"Authorization": "tok"}):
            r = http.get("/v1/models", headers=headers)
            expect_error(r, 401, "bearer token")
            assert r.headers["www-authenticate"] == "Bearer"
            expect_error(http.post("/v1/score", json=img, headers=headers), 401)
            expect_error(http.post("/v1/update", json={"model": "noop"}, headers=headers), 401)

        r = http.get("/v1/models", headers=good)
        assert r.status_code == 200 and [m["name"] for m in r.json()["models"]] == ["noop"]
        # The scheme is case-insensitive (RFC 7235).
        assert http.get("/v1/models", headers={"authorization": "bearer tok"}).status_code == 200
        r = http.post("/v1/score", json=img, headers=good)
        assert r.status_code == 200, r.text
        assert len(r.json()["groups"][0]["rewards"]) == 1
        # Authorised, then refused for what it asks: the token check comes first, the request's own errors after.
        expect_error(http.post("/v1/update", json={"model": "noop"}, headers=good), 409, "not trainable")


# ---------------------------------------------------------------- stats helpers (no server)


def test_stats_json_has_no_nan():
    assert _finite({"a": [1.0, float("nan"), {"b": float("inf")}], "c": "x", "d": 2}) == {
        "a": [1.0, None, {"b": None}],
        "c": "x",
        "d": 2,
    }


def test_update_history_survives_a_flood_of_score_events(http, client):
    rng = np.random.default_rng(9)
    done = client.update_discriminator("dino", [Group("a", [smooth_image(rng)])], [Group("a", [noise_image(rng)])])
    # More score events than the host's recent-event buffer holds (500).
    tiny = np.zeros((2, 2, 3), np.uint8)
    answered = list(client.score_stream((Group("p", [tiny]) for _ in range(520)), {"dino": 1.0}))
    assert len(answered) == 520
    stats = http.get("/v1/stats").json()
    versions = [p["version"] for p in stats["updates"]["dino"]]
    assert done.version in versions and versions == sorted(versions)
    assert all(e["kind"] == "score" for e in stats["events"])  # the update event itself was evicted


def test_bodies_over_the_limit_are_refused_before_they_are_read(start_server, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("server: {drain_notice_s: 5}\n")
    server = start_server("--preset", "noop", "--max-message-bytes", "1024", "--config", str(config))
    url = server.info["http"]
    with httpx.Client(base_url=url, timeout=30) as http:
        expect_error(http.post("/v1/score", content=b"{" + b" " * 5000 + b"}"), 413, "exceeds the limit of 2048")

        def chunks():  # no Content-Length: refused while it streams in
            for _ in range(100):
                yield b" " * 1000

        expect_error(http.post("/v1/score", content=chunks()), 413, "exceeds the limit of 2048 bytes")
        assert (
            http.post(
                "/v1/score", json={"groups": [group_json([smooth_image(np.random.default_rng(0), 8)])]}
            ).status_code
            == 200
        )

        def ready_gauge() -> float:
            lines = [x for x in http.get("/metrics").text.splitlines() if x.startswith("advgrpo_ready ")]
            return float(lines[0].split()[1])

        assert ready_gauge() == 1.0
        server.proc.send_signal(signal.SIGTERM)  # draining: /readyz and the gauge both say not ready
        deadline = time.monotonic() + 4
        while http.get("/readyz").status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert http.get("/readyz").status_code == 503 and ready_gauge() == 0.0
