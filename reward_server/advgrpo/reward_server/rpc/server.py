"""Builds the grpc.aio server: RewardService + health + reflection, interceptors, message limits."""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from advgrpo.common.errors import ConfigError
from advgrpo.reward_server.auth import TokenTable, build_table
from advgrpo.reward_server.config import ServerSettings, read_pem
from advgrpo.reward_server.config import address as listen_address
from advgrpo.reward_server.host import ModelHost
from advgrpo.reward_server.rpc.interceptors import (
    AuthInterceptor,
    ConcurrencyInterceptor,
    ErrorInterceptor,
    MetricsInterceptor,
)
from advgrpo.reward_server.rpc.servicer import SERVICE as SERVICE_NAME
from advgrpo.reward_server.rpc.servicer import RewardServicer


def token_table(settings: ServerSettings) -> TokenTable:
    return build_table(settings.tokens_file, settings.tokens, settings.auth_token)


def server_credentials(settings: ServerSettings) -> grpc.ServerCredentials | None:
    """TLS credentials from --tls-cert/--tls-key; with --tls-client-ca, client certificates
    signed by that CA are required (mutual TLS). None: plaintext."""
    if settings.tls_cert is None:
        return None
    client_ca = settings.tls_client_ca
    return grpc.ssl_server_credentials(
        [(read_pem(settings.tls_key, "--tls-key"), read_pem(settings.tls_cert, "--tls-cert"))],
        root_certificates=read_pem(client_ca, "--tls-client-ca") if client_ca is not None else None,
        require_client_auth=client_ca is not None,
    )


class GrpcFrontend:
    def __init__(self, host: ModelHost):
        self.host = host
        settings = host.config.server
        interceptors = [MetricsInterceptor(host.metrics)]
        tokens = token_table(settings)
        if tokens:  # before the limit: a call without a valid token never takes a slot
            interceptors.append(AuthInterceptor(tokens))
        interceptors.append(ConcurrencyInterceptor(settings.max_concurrent_rpcs, host.metrics))
        interceptors.append(ErrorInterceptor())
        limit = settings.max_message_bytes
        self.server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                ("grpc.so_reuseport", 0),
            ],
        )
        RewardServicer(host).add_to_server(self.server)
        self.health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.server,
        )
        address = listen_address(settings.host, settings.port)
        try:
            credentials = server_credentials(settings)
            if credentials is None:
                self.port = self.server.add_insecure_port(address)
            else:
                self.port = self.server.add_secure_port(address, credentials)
        except RuntimeError as exc:
            raise ConfigError(f"--host/--port {address}: cannot listen ({exc})") from None
        if self.port == 0:
            raise ConfigError(f"--host/--port {address}: cannot listen (address in use or not local)")

    async def start(self) -> None:
        await self.server.start()
        # Models are loaded and warmed up before the frontend exists: serving at once.
        await self.set_serving(True)

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        await self.health.set("", status)
        await self.health.set(SERVICE_NAME, status)

    async def drain(self, notice_s: float, grace_s: float) -> None:
        """NOT_SERVING first, still answering for ``notice_s`` so health checkers and load
        balancers see it; then refuse new RPCs and give in-flight ones ``grace_s`` to finish."""
        await self.set_serving(False)
        await asyncio.sleep(notice_s)
        await self.server.stop(grace_s)
