"""The standard gRPC health check (grpc.health.v1.Health/Check) with grpcio alone.

grpcio-health-checking would register its own copy of health.proto; the client needs two tiny
messages, so it writes and reads them by hand (advgrpo.client.encoding):
``HealthCheckRequest {string service = 1;}`` and ``HealthCheckResponse {ServingStatus status = 1;}``.
"""

from __future__ import annotations

import grpc

from advgrpo.client.encoding import read_fields, string_field

CHECK_METHOD = "/grpc.health.v1.Health/Check"

# HealthCheckResponse.ServingStatus
STATUS_NAMES = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}


def serialize_request(service: str) -> bytes:
    """A HealthCheckRequest for ``service`` ("" is the whole server)."""
    return string_field(1, service)


def parse_status(data: bytes) -> str:
    """The serving status of a HealthCheckResponse, by name ("SERVING", ...); one this client does
    not know by its number. Unknown fields are skipped; ValueError if ``data`` is malformed."""
    status = 0  # proto3: an absent enum field is its zero value, UNKNOWN
    for number, wire_type, value in read_fields(data):
        if number == 1:
            if wire_type != 0:
                raise ValueError(f"HealthCheckResponse.status: wire type {wire_type}, expected a varint")
            status = value
    return STATUS_NAMES.get(status, str(status))


def check_method(channel: grpc.Channel) -> grpc.UnaryUnaryMultiCallable:
    """Health/Check on ``channel``: call it with the service name, it returns the status's name."""
    return channel.unary_unary(CHECK_METHOD, request_serializer=serialize_request, response_deserializer=parse_status)
