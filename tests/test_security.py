"""Issue 15, security: tokens with scopes (gRPC and HTTP alike), the refusal to listen beyond
loopback with no tokens, TLS and mutual TLS, and no deserialisation of untrusted code."""

from __future__ import annotations

import ast
import re
import ssl
import subprocess
import sys

import grpc
import httpx
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from advgrpo.client import Group, RetryPolicy, RewardClient
from advgrpo.common.errors import ConfigError
from advgrpo.reward_server.auth import MIN_TOKEN_CHARS, build_table, parse_tokens
from advgrpo.reward_server.config import load_config

from .conftest import REPO
from .tls_helpers import make_tls_files

SCORER = "score-token-0123456789abcdef"
UPDATER = "update-token-0123456789abcdef"
NOOP = "models:\n  noop: {kind: noop, weight: 1.0}\n"


def image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


@pytest.fixture
def noop_config(tmp_path):
    cfg = tmp_path / "noop.yaml"
    cfg.write_text(NOOP)
    return cfg


@pytest.fixture
def tokens_file(tmp_path):
    f = tmp_path / "tokens"
    f.write_text(f"# who may do what\n{SCORER} score   # trainers' evaluation jobs\n\n{UPDATER} update\n")
    return f


# ---------------------------------------------------------------- the token table


def test_tokens_parse_with_comments_commas_and_errors_that_name_the_line_not_the_token(tmp_path):
    assert parse_tokens(f"{SCORER} score, {UPDATER} update # c\n", "$X") == [(SCORER, "score"), (UPDATER, "update")]
    table = build_table(None, f"{SCORER} score", single_token="short")  # --auth-token keeps any length
    assert table.scope_of(SCORER) == "score" and table.scope_of("short") == "update"
    assert table.scope_of("nope") is None and table.scope_of(SCORER[:-1]) is None
    assert table.scope_of_header(f"bEaReR {SCORER}") == "score"
    for header in (SCORER, f"Basic {SCORER}", "Bearer ", "", None):
        assert table.scope_of_header(header) is None
    bad = tmp_path / "bad"
    for text, message in (
        (f"{SCORER}\n", "line 1: expected 'TOKEN SCOPE'"),
        (f"# ok\n{SCORER} admin\n", "line 2: unknown scope 'admin'"),
        ("tiny score\n", f"at least {MIN_TOKEN_CHARS} characters"),
        ("# nothing\n", "no tokens in it"),
        (f"{SCORER} score\n{SCORER} update\n", "two scopes"),
    ):
        bad.write_text(text)
        with pytest.raises(ConfigError, match=re.escape(message)) as info:
            build_table(bad)
        assert SCORER not in str(info.value)
    with pytest.raises(ConfigError, match=f"--tokens-file {tmp_path / 'absent'}: cannot read"):
        build_table(tmp_path / "absent")


# ---------------------------------------------------------------- scopes over gRPC and HTTP


def test_scopes_on_grpc_and_http_alike(start_server, noop_config, tokens_file):
    server = start_server("--config", str(noop_config), "--tokens-file", str(tokens_file))
    groups = [Group("p", [image()])]
    with RewardClient(server.target) as anonymous, RewardClient(server.target, token="x" * 20) as unknown:
        for client in (anonymous, unknown):
            assert code_of(client.list_models) == grpc.StatusCode.UNAUTHENTICATED
            assert code_of(lambda c=client: c.score(groups)) == grpc.StatusCode.UNAUTHENTICATED
            assert code_of(lambda c=client: list(c.score_stream(groups))) == grpc.StatusCode.UNAUTHENTICATED
            assert code_of(lambda c=client: c.update_discriminator("noop", groups, groups)) == (
                grpc.StatusCode.UNAUTHENTICATED
            )
    with RewardClient(server.target, token=SCORER, shared_memory="auto") as scorer:
        assert scorer.score(groups)[0].rewards == [0.0]
        assert [r.rewards for r in scorer.score_stream(groups)] == [[0.0]]
        with pytest.raises(grpc.RpcError) as info:
            scorer.update_discriminator("noop", groups, groups)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "UpdateDiscriminator needs a token with the 'update' scope" in info.value.details()
    with RewardClient(server.target, token=UPDATER) as updater:
        assert updater.score(groups)[0].rewards == [0.0]  # update implies score
        with pytest.raises(grpc.RpcError) as info:  # past auth: refused by the model itself
            updater.update_discriminator("noop", groups, groups)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION, info.value.details()
    # Health and reflection stay open.
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        answers = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
        )
        names = {s.name for a in answers for s in a.list_services_response.service}
        assert "advgrpo.reward.v1.RewardService" in names

    body = {"groups": [{"prompt": "p", "images": [{"encoding": "ENCODING_RAW_RGB8", "height": 2, "width": 2,
                                                   "data": "AAAAAAAAAAAAAAAA"}]}]}  # fmt: skip
    update = {"model": "noop"}
    with httpx.Client(base_url=server.http, timeout=30) as http:
        for path in ("/healthz", "/readyz", "/metrics"):
            assert http.get(path).status_code == 200, path
        for headers in ({}, {"Authorization": "Bearer " + "x" * 20}):
            assert http.get("/v1/models", headers=headers).status_code == 401
            assert http.post("/v1/score", json=body, headers=headers).status_code == 401
            assert http.post("/v1/update", json=update, headers=headers).status_code == 401
        scorer = {"Authorization": f"Bearer {SCORER}"}
        assert http.get("/v1/models", headers=scorer).status_code == 200
        assert http.post("/v1/score", json=body, headers=scorer).json()["groups"][0]["rewards"] == [0.0]
        r = http.post("/v1/update", json=update, headers=scorer)
        assert r.status_code == 403 and "'update' scope" in r.json()["error"], r.text
        r = http.post("/v1/update", json=update, headers={"Authorization": f"Bearer {UPDATER}"})
        assert r.status_code == 409, r.text  # past auth: not trainable


def test_tokens_from_the_environment_and_the_single_token_flag(start_server, noop_config):
    server = start_server(
        "--config", str(noop_config), "--no-http", "--auth-token", "legacy",
        env={"ADVGRPO_TOKENS": f"{SCORER} score, {UPDATER} update"},
    )  # fmt: skip
    groups = [Group("p", [image()])]
    for token, update_code in ((SCORER, grpc.StatusCode.PERMISSION_DENIED), ("legacy", None), (UPDATER, None)):
        with RewardClient(server.target, token=token) as client:
            assert client.score(groups)[0].rewards == [0.0]
            code = code_of(lambda c=client: c.update_discriminator("noop", groups, groups))
            assert code == (update_code or grpc.StatusCode.FAILED_PRECONDITION)


def test_a_bad_tokens_file_stops_the_start_with_its_name_and_line(tmp_path, noop_config):
    bad = tmp_path / "tokens"
    bad.write_text(f"{SCORER} score\n{UPDATER} admin\n")
    out = subprocess.run(
        [sys.executable, "-m", "advgrpo.reward_server", "--config", str(noop_config), "--tokens-file", str(bad),
         "--port", "0", "--no-http"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2
    assert f"--tokens-file {bad}, line 2: unknown scope 'admin'" in out.stderr, out.stderr
    assert UPDATER not in out.stderr and SCORER not in out.stderr


# ---------------------------------------------------------------- listening beyond loopback


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.7", "reward.example"])
def test_listening_beyond_loopback_needs_tokens_or_insecure(host, tokens_file):
    with pytest.raises(ConfigError, match="--insecure") as info:
        load_config("noop", overrides={"server": {"host": host}})
    assert "tokens" in str(info.value)
    assert load_config("noop", overrides={"server": {"host": host, "insecure": True}}).server.insecure
    assert load_config("noop", overrides={"server": {"host": host, "tokens_file": str(tokens_file)}})
    for loopback in ("127.0.0.1", "127.3.2.1", "::1", "[::1]", "localhost"):
        assert load_config("noop", overrides={"server": {"host": loopback}})


def test_the_cli_refuses_an_open_public_address_and_says_which_flag_allows_it(noop_config):
    def run(*args):
        return subprocess.run(
            [sys.executable, "-m", "advgrpo.reward_server", "--config", str(noop_config), "--print-config", *args],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    refused = run("--host", "0.0.0.0")
    assert refused.returncode == 2 and "--insecure" in refused.stderr and "0.0.0.0" in refused.stderr
    allowed = run("--host", "0.0.0.0", "--insecure", "--auth-token", "s3cret")
    assert allowed.returncode == 0, allowed.stderr
    assert "s3cret" not in allowed.stdout and "<redacted>" in allowed.stdout  # secrets never printed


def test_the_trainer_never_prints_its_token():
    out = subprocess.run(
        [sys.executable, "-m", "advgrpo.trainer.train", "--preset", "tiny", "--set", "reward.token=sekrit-0123456789",
         "--print-config"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "sekrit-0123456789" not in out.stdout and "token: <redacted>" in out.stdout


# ---------------------------------------------------------------- TLS


ONCE = RetryPolicy(max_elapsed_s=None, max_attempts=1)  # a refused handshake: no point retrying


def trusting(tls, with_client_cert: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(tls.ca))
    if with_client_cert:
        context.load_cert_chain(str(tls.client_cert), str(tls.client_key))
    return context


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    return make_tls_files(tmp_path_factory.mktemp("tls"))


def test_tls_serves_grpc_and_http_and_refuses_plaintext(start_server, noop_config, tls):
    server = start_server(
        "--config", str(noop_config), "--tls-cert", str(tls.server_cert), "--tls-key", str(tls.server_key)
    )
    assert server.info["tls"] is True and server.http.startswith("https://")
    groups = [Group("p", [image()])]
    with RewardClient(server.target, tls_ca=tls.ca) as client:
        assert client.health() == "SERVING"
        assert client.score(groups)[0].rewards == [0.0]
    with RewardClient(server.target, timeout_s=5, retry=ONCE) as plain:
        assert code_of(lambda: plain.score(groups)) == grpc.StatusCode.UNAVAILABLE
    with RewardClient(
        server.target, tls=True, timeout_s=5, retry=ONCE
    ) as untrusting:  # the system CAs do not know ours
        assert code_of(lambda: untrusting.score(groups)) == grpc.StatusCode.UNAVAILABLE
    with httpx.Client(base_url=server.http, verify=trusting(tls), timeout=30) as http:
        assert http.get("/healthz").status_code == 200
    with pytest.raises(httpx.HTTPError):
        httpx.get(server.http.replace("https://", "http://") + "/healthz", timeout=10)


def test_mutual_tls_requires_a_client_certificate_from_the_ca(start_server, noop_config, tls):
    server = start_server(
        "--config", str(noop_config), "--tls-cert", str(tls.server_cert), "--tls-key", str(tls.server_key),
        "--tls-client-ca", str(tls.ca),
    )  # fmt: skip
    groups = [Group("p", [image()])]
    with RewardClient(server.target, tls_ca=tls.ca, tls_cert=tls.client_cert, tls_key=tls.client_key) as client:
        assert client.score(groups)[0].rewards == [0.0]
    for cert, key in ((None, None), (tls.rogue_cert, tls.rogue_key)):
        with RewardClient(server.target, tls_ca=tls.ca, tls_cert=cert, tls_key=key, timeout_s=5, retry=ONCE) as refused:
            assert code_of(lambda c=refused: c.score(groups)) == grpc.StatusCode.UNAVAILABLE
    with httpx.Client(base_url=server.http, verify=trusting(tls, with_client_cert=True), timeout=30) as http:
        assert http.get("/healthz").status_code == 200
    with pytest.raises(httpx.HTTPError):
        with httpx.Client(base_url=server.http, verify=trusting(tls), timeout=10) as http:
            http.get("/healthz")


def test_tls_settings_are_checked_at_start(tmp_path, tls):
    with pytest.raises(ConfigError, match="give both"):
        load_config("noop", overrides={"server": {"tls_cert": str(tls.server_cert)}})
    with pytest.raises(ConfigError, match="needs the server's own --tls-cert"):
        load_config("noop", overrides={"server": {"tls_client_ca": str(tls.ca)}})
    not_pem = tmp_path / "cert.txt"
    not_pem.write_text("hello")
    with pytest.raises(ConfigError, match=f"--tls-cert {not_pem}: not a PEM file"):
        load_config("noop", overrides={"server": {"tls_cert": str(not_pem), "tls_key": str(tls.server_key)}})
    with pytest.raises(ConfigError, match=f"--tls-key {tmp_path / 'absent'}: cannot read"):
        load_config(
            "noop", overrides={"server": {"tls_cert": str(tls.server_cert), "tls_key": str(tmp_path / "absent")}}
        )


@pytest.mark.slow
def test_the_trainer_trains_against_a_mutual_tls_server_with_a_token(start_server, tls, tmp_path):
    from .trainer_helpers import make_reference_set, read_metrics

    refs = make_reference_set(tmp_path / "refs")
    server = start_server(
        "--preset", "tiny", "--no-http", "--tokens-file", str(_tokens(tmp_path)),
        "--tls-cert", str(tls.server_cert), "--tls-key", str(tls.server_key), "--tls-client-ca", str(tls.ca),
    )  # fmt: skip
    out = tmp_path / "run"
    run = subprocess.run(
        [sys.executable, "-m", "advgrpo.trainer.train", "--preset", "tiny", "--server", server.target,
         "--output-dir", str(out), "--epochs", "2", "--set", f"adversarial.references={refs}",
         "--set", f"reward.tls_ca={tls.ca}", "--set", f"reward.tls_cert={tls.client_cert}",
         "--set", f"reward.tls_key={tls.client_key}", "--set", "run.tensorboard=false"],
        capture_output=True, text=True, timeout=300, cwd=REPO, env={**_env(), "ADVGRPO_AUTH_TOKEN": UPDATER},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    epochs = [m for m in read_metrics(out) if "reward_mean" in m]
    assert len(epochs) == 2
    with RewardClient(
        server.target, token=SCORER, tls_ca=tls.ca, tls_cert=tls.client_cert, tls_key=tls.client_key
    ) as c:
        assert {m.name: m.version for m in c.list_models()}["dino"] >= 1  # the trainer's update went through


def _tokens(tmp_path):
    f = tmp_path / "tokens"
    f.write_text(f"{SCORER} score\n{UPDATER} update\n")
    return f


def _env():
    import os

    return {k: v for k, v in os.environ.items() if k not in ("ADVGRPO_AUTH_TOKEN", "ADVGRPO_TOKENS")}


# ---------------------------------------------------------------- nothing deserialises code

SOURCES = ["client", "common", "kernels", "protos", "reward_server", "trainer", "experiments", "bench", "scripts"]
# The one deliberate use: the benchmark's stand-in for the reward servers this field uses, which
# pickle over HTTP (it talks only to itself, on loopback). Never imported by the product.
ALLOWED_PICKLE = {"bench/pickle_baseline.py", "bench/transport.py"}


def _python_files():
    for top in SOURCES:
        for path in sorted((REPO / top).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            if "/build/" not in rel and not rel.endswith("_pb2.py") and not rel.endswith("_pb2_grpc.py"):
                yield rel, path


def scan(files) -> list[str]:
    """Each import of a pickle-like module, eval/exec, torch.load without weights_only=True,
    yaml's unsafe loaders and np.load(allow_pickle=True) in ``files`` ((name, path) pairs)."""
    problems = []
    for rel, path in files:
        tree = ast.parse(path.read_text(), rel)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                for name in names:
                    root = (name or "").split(".")[0]
                    if root in ("pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"):
                        if rel not in ALLOWED_PICKLE:
                            problems.append(f"{rel}:{node.lineno}: imports {name}")
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            keywords = {k.arg: k.value for k in node.keywords}
            if isinstance(func, ast.Name) and func.id in ("eval", "exec", "__import__"):
                problems.append(f"{rel}:{node.lineno}: {func.id}()")
            if not (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)):
                continue
            owner, name = func.value.id, func.attr
            if owner == "torch" and name == "load":
                weights_only = keywords.get("weights_only")
                if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                    problems.append(f"{rel}:{node.lineno}: torch.load without weights_only=True")
            if owner == "yaml" and name in ("load", "load_all", "unsafe_load", "full_load"):
                problems.append(f"{rel}:{node.lineno}: yaml.{name} (use yaml.safe_load)")
            if owner in ("np", "numpy") and name == "load":
                allow = keywords.get("allow_pickle")
                if isinstance(allow, ast.Constant) and allow.value is True:
                    problems.append(f"{rel}:{node.lineno}: np.load(allow_pickle=True)")
    return problems


def test_no_source_deserialises_untrusted_code():
    files = list(_python_files())
    assert len(files) > 80  # the scan sees the sources
    problems = scan(files)
    assert not problems, "\n".join(problems)


def test_the_scan_finds_what_it_looks_for(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text(
        "import pickle\nimport torch, yaml\nimport numpy as np\ntorch.load('x')\ntorch.load('x', weights_only=False)\n"
        "torch.load('x', weights_only=True)\nyaml.load('x')\nyaml.safe_load('x')\neval('1')\nmodel.eval()\n"
        "np.load('x', allow_pickle=True)\n"
    )
    problems = scan([("planted.py", planted)])
    assert problems == [
        "planted.py:1: imports pickle",
        "planted.py:4: torch.load without weights_only=True",
        "planted.py:5: torch.load without weights_only=True",
        "planted.py:7: yaml.load (use yaml.safe_load)",
        "planted.py:9: eval()",
        "planted.py:11: np.load(allow_pickle=True)",
    ]
