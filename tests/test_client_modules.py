"""The client's pieces on their own: gRFC A6 pushback parsing and the service-config retryPolicy
(advgrpo.client.retry), the hand-written health messages (advgrpo.client.health), and
health()/wait_ready() against an in-process grpc.health.v1 server."""

from __future__ import annotations

import json
import threading
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from advgrpo.client import RetryPolicy, RewardClient
from advgrpo.client import health as client_health
from advgrpo.client.retry import (
    GRPC_MAX_ATTEMPTS,
    RetryBudget,
    channel_options,
    grpc_attempts,
    grpc_retry_policy,
    pushback_s,
)
from advgrpo.common.protocol import NO_RETRY_PUSHBACK, RETRY_PUSHBACK_KEY

from .test_client import free_port

UNAVAILABLE, RESOURCE_EXHAUSTED = grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED


class Failed(grpc.RpcError):
    """A failed call as grpc raises it: a status code and trailing metadata."""

    def __init__(self, code: grpc.StatusCode, trailer=()):
        self._code, self._trailer = code, tuple(trailer)

    def code(self) -> grpc.StatusCode:
        return self._code

    def trailing_metadata(self):
        return self._trailer


def pushback(value) -> Failed:
    return Failed(RESOURCE_EXHAUSTED, ((RETRY_PUSHBACK_KEY, value),))


# ---------------------------------------------------------------- pushback (A6)


def test_pushback_is_read_as_a6_says():
    assert RETRY_PUSHBACK_KEY == "grpc-retry-pushback-ms"
    assert pushback_s(pushback("150")) == 0.15
    assert pushback_s(pushback("0")) == 0.0
    assert pushback_s(pushback(b"2500")) == 2.5
    # Negative or unparseable: the server asks not to retry at all.
    for value in (NO_RETRY_PUSHBACK, "-20", "", "1.5", "soon", "0x10"):
        assert pushback_s(pushback(value)) == -1.0, value
    assert pushback_s(Failed(RESOURCE_EXHAUSTED)) is None  # none sent
    assert pushback_s(Failed(RESOURCE_EXHAUSTED, (("other-key", "10"),))) is None
    assert pushback_s(ValueError("not a call")) is None  # no trailing metadata at all


def test_a_transient_refusal_waits_at_least_its_pushback():
    policy = RetryPolicy(initial_backoff_s=0.001, max_backoff_s=0.002, max_elapsed_s=60)
    budget = RetryBudget(policy, "test")
    assert budget.delay(pushback("300"), "call") >= 0.3
    assert budget.delay(Failed(UNAVAILABLE, ((RETRY_PUSHBACK_KEY, "400"),)), "call") >= 0.4
    assert budget.delay(Failed(UNAVAILABLE), "call") <= 0.002  # no pushback: the backoff
    # Not retried: a size limit (no pushback or a negative one), a negative pushback on anything.
    assert budget.delay(Failed(RESOURCE_EXHAUSTED), "call") is None
    assert budget.delay(pushback("-1"), "call") is None
    assert budget.delay(Failed(UNAVAILABLE, ((RETRY_PUSHBACK_KEY, "-1"),)), "call") is None
    assert budget.delay(Failed(grpc.StatusCode.INVALID_ARGUMENT), "call") is None


def test_the_pushback_never_outlasts_the_time_budget():
    budget = RetryBudget(RetryPolicy(max_elapsed_s=0.5), "test")
    assert budget.delay(pushback("60000"), "call") <= 0.5


def test_max_attempts_counts_every_attempt():
    budget = RetryBudget(RetryPolicy(max_attempts=3, max_elapsed_s=None), "test")
    assert budget.delay(Failed(UNAVAILABLE), "call") is not None
    assert budget.delay(pushback("0"), "call") is not None
    assert budget.delay(Failed(UNAVAILABLE), "call") is None  # the third attempt was the last
    budget.renew()
    assert budget.delay(Failed(UNAVAILABLE), "call") is not None


# ---------------------------------------------------------------- the service config


def test_the_default_policy_runs_in_grpcs_own_retry():
    policy = RetryPolicy(initial_backoff_s=0.25, max_backoff_s=4.0, multiplier=3.0)
    assert grpc_retry_policy(policy) == {
        "maxAttempts": GRPC_MAX_ATTEMPTS,
        "initialBackoff": "0.250s",
        "maxBackoff": "4.000s",
        "backoffMultiplier": 3.0,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    options = dict(channel_options(policy, "advgrpo.reward.v1.RewardService", ["Score", "ListModels"], 64 << 20))
    assert options["grpc.enable_retries"] == 1
    assert options["grpc.per_rpc_retry_buffer_size"] >= 64 << 20  # every request can be resent
    (method_config,) = json.loads(options["grpc.service_config"])["methodConfig"]
    assert method_config["name"] == [
        {"service": "advgrpo.reward.v1.RewardService", "method": "Score"},
        {"service": "advgrpo.reward.v1.RewardService", "method": "ListModels"},
    ]
    assert method_config["retryPolicy"] == grpc_retry_policy(policy)
    # gRPC's attempts count in full where it retries the status, else one.
    assert grpc_attempts(policy, Failed(UNAVAILABLE)) == GRPC_MAX_ATTEMPTS
    assert grpc_attempts(policy, Failed(UNAVAILABLE, ((RETRY_PUSHBACK_KEY, "-1"),))) == 1
    assert grpc_attempts(policy, pushback("10")) == 1


def test_grpcs_attempts_fit_in_the_calls_deadline():
    """Its backoffs may add up to a quarter of the deadline: fewer attempts for a short one, none
    where one backoff would not fit (the client then makes each attempt itself)."""
    policy = RetryPolicy(initial_backoff_s=0.1, max_backoff_s=1.0, multiplier=2.0)
    assert grpc_retry_policy(policy, deadline_s=120)["maxAttempts"] == GRPC_MAX_ATTEMPTS  # 0.1+0.2+0.4+0.8
    assert grpc_retry_policy(policy, deadline_s=2.0)["maxAttempts"] == 3  # 0.1+0.2 <= 0.5 < 0.7
    assert grpc_retry_policy(policy, deadline_s=0.3) is None  # 0.1 > 0.075
    assert grpc_attempts(policy, Failed(UNAVAILABLE), deadline_s=2.0) == 3
    assert grpc_attempts(policy, Failed(UNAVAILABLE), deadline_s=0.3) == 1
    options = dict(channel_options(policy, "s", ["Score"], 1 << 20, deadline_s=0.3))
    assert "grpc.service_config" not in options


def test_what_grpcs_retry_does_not_run():
    # RESOURCE_EXHAUSTED stays ours, even when the policy lists it.
    both = RetryPolicy(retryable=(UNAVAILABLE, RESOURCE_EXHAUSTED))
    assert grpc_retry_policy(both)["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert grpc_retry_policy(RetryPolicy(retryable=(RESOURCE_EXHAUSTED,))) is None
    # Counted attempts and a zero time budget: the client makes each attempt itself.
    assert grpc_retry_policy(RetryPolicy(max_attempts=3)) is None
    assert grpc_retry_policy(RetryPolicy(max_attempts=3, max_elapsed_s=None)) is None
    assert grpc_retry_policy(RetryPolicy(max_elapsed_s=0)) is None
    options = dict(channel_options(RetryPolicy(max_attempts=2), "s", ["m"], 1 << 20))
    assert "grpc.service_config" not in options
    assert grpc_attempts(RetryPolicy(max_attempts=2), Failed(UNAVAILABLE)) == 1


# ---------------------------------------------------------------- the health messages


def test_hand_written_health_messages_match_grpc_health():
    for service in ("", "advgrpo.reward.v1.RewardService", "ünïcode.Service", "x" * 300):
        expected = health_pb2.HealthCheckRequest(service=service).SerializeToString()
        assert client_health.serialize_request(service) == expected
    for name, number in health_pb2.HealthCheckResponse.ServingStatus.items():
        data = health_pb2.HealthCheckResponse(status=number).SerializeToString()
        assert client_health.parse_status(data) == name
        assert client_health.STATUS_NAMES[number] == name
    assert client_health.parse_status(b"") == "UNKNOWN"  # proto3: an absent enum is its zero value
    # Unknown fields of a newer server are skipped; an unknown status is given by its number.
    newer = b"\x12\x03abc" + b"\x08\x01" + b"\x18\x96\x01" + b"\x25\x00\x00\x00\x00" + b"\x29" + bytes(8)
    assert client_health.parse_status(newer) == "SERVING"
    assert client_health.parse_status(b"\x08\x07") == "7"
    for bad in (b"\x08", b"\x12\x05ab", b"\x0a\x01x", b"\x0b", b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01"):
        with pytest.raises(ValueError):
            client_health.parse_status(bad)


class HealthServer:
    """grpc_health's own servicer on ``port`` (a free one by default), in this process."""

    def __init__(self, port: int = 0):
        self.servicer = health.HealthServicer()
        self.server = grpc.server(futures.ThreadPoolExecutor(2))
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, self.server)
        self.port = self.server.add_insecure_port(f"127.0.0.1:{port}")
        self.target = f"127.0.0.1:{self.port}"

    def set(self, service: str, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        self.servicer.set(service, status)

    def start(self) -> "HealthServer":
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop(0)


@pytest.fixture
def health_servers():
    started: list[HealthServer] = []
    yield started
    for server in started:
        server.stop()


def test_health_answers_for_the_server_and_for_services(health_servers):
    server = HealthServer().start()
    health_servers.append(server)
    server.set("", True)
    server.set("advgrpo.reward.v1.RewardService", False)
    with RewardClient(server.target) as client:
        assert client.health() == "SERVING"
        assert client.health("advgrpo.reward.v1.RewardService") == "NOT_SERVING"
        with pytest.raises(grpc.RpcError) as info:
            client.health("no.such.Service")
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        client.wait_ready(10)


def test_wait_ready_waits_for_a_server_that_is_not_listening_yet(health_servers):
    """wait_for_ready: the health check is held until the channel connects, then answered."""
    port = free_port()
    with RewardClient(f"127.0.0.1:{port}") as client:
        with pytest.raises(grpc.RpcError) as info:
            client.health(timeout_s=5)  # a plain check fails at once: nothing listens
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE

        def start() -> None:
            server = HealthServer(port)
            health_servers.append(server)
            server.set("", True)
            server.start()

        timer = threading.Timer(1.0, start)
        timer.start()
        try:
            client.wait_ready(60)
        finally:
            timer.join()
        assert client.health() == "SERVING"


def test_wait_ready_asks_again_until_serving_and_times_out_otherwise(health_servers):
    server = HealthServer().start()
    health_servers.append(server)
    server.set("", False)
    with RewardClient(server.target) as client:
        with pytest.raises(TimeoutError, match="not SERVING"):
            client.wait_ready(0.5)
        timer = threading.Timer(0.5, server.set, args=("", True))
        timer.start()
        try:
            client.wait_ready(60)
        finally:
            timer.join()


def test_wait_ready_times_out_where_nothing_listens():
    with RewardClient(f"127.0.0.1:{free_port()}") as client:
        with pytest.raises(TimeoutError, match="not SERVING"):
            client.wait_ready(0.5)
