"""A stand-in for Envoy's rate-limit service (envoy.service.ratelimit.v3.RateLimitService), to see
the descriptors Envoy sends and to answer OK or OVER_LIMIT on demand.

The real service (envoyproxy/ratelimit with Redis) is not installable here; this one speaks the
same gRPC method with hand-decoded protobuf, which is all a test of the descriptors needs.
"""

from __future__ import annotations

import threading
from concurrent import futures

import grpc

SERVICE = "envoy.service.ratelimit.v3.RateLimitService"
OK, OVER_LIMIT = 1, 2


def _varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, at


def _fields(data: bytes):
    """(field number, wire type, value) of a protobuf message; length-delimited values as bytes."""
    at = 0
    while at < len(data):
        key, at = _varint(data, at)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, at = _varint(data, at)
        elif wire == 2:
            length, at = _varint(data, at)
            value, at = data[at:at + length], at + length
        elif wire == 1:
            value, at = data[at:at + 8], at + 8
        elif wire == 5:
            value, at = data[at:at + 4], at + 4
        else:
            raise ValueError(f"wire type {wire}")
        yield number, wire, value


def decode_request(data: bytes) -> tuple[str, list[dict[str, str]]]:
    """RateLimitRequest: domain (1), descriptors (2: entries (1: key 1, value 2))."""
    domain, descriptors = "", []
    for number, _, value in _fields(data):
        if number == 1:
            domain = value.decode()
        elif number == 2:
            entries = {}
            for n, _, entry in _fields(value):
                if n == 1:
                    parts = {k: v.decode() for k, _, v in _fields(entry) if k in (1, 2)}
                    entries[parts.get(1, "")] = parts.get(2, "")
            descriptors.append(entries)
    return domain, descriptors


class FakeRateLimitService:
    def __init__(self):
        self.calls: list[tuple[str, list[dict[str, str]]]] = []
        self.answer = OK
        self._lock = threading.Lock()
        self._server = grpc.server(futures.ThreadPoolExecutor(4))
        handler = grpc.method_handlers_generic_handler(SERVICE, {
            "ShouldRateLimit": grpc.unary_unary_rpc_method_handler(self._should_rate_limit),
        })
        self._server.add_generic_rpc_handlers((handler,))
        self.port = self._server.add_insecure_port("127.0.0.1:0")

    def _should_rate_limit(self, request: bytes, context) -> bytes:
        with self._lock:
            self.calls.append(decode_request(request))
            answer = self.answer
        return bytes([0x08, answer])  # RateLimitResponse.overall_code

    def start(self) -> "FakeRateLimitService":
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(0)
