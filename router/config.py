"""The router's configuration."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RouterConfig:
    model_path: str  # HF model folder: the router loads only its tokenizer and chat template
    served_model_name: str = ""  # the name in /v1/models and requests; "" = the folder's name
    host: str = "127.0.0.1"  # HTTP bind address
    port: int = 8000  # HTTP port
    worker_address: str = "tcp://127.0.0.1:7100"  # ZMQ ROUTER socket the workers connect to
    heartbeat_timeout_s: float = 5.0  # a worker silent this long is dropped
    request_timeout_s: float = 600.0  # no token for this long fails the request
    max_inflight_requests: int = 512  # admitted at once; more get 429
    max_body_bytes: int = 4 << 20  # larger bodies get 413
    max_redispatch: int = 2  # times a request may move to other workers before it fails
    kv_transports: tuple[str, ...] = ("shm", "tcp")  # allowed, best first

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        if self.heartbeat_timeout_s <= 0 or self.request_timeout_s <= 0:
            raise ValueError("timeouts must be positive")
        if self.max_inflight_requests < 1:
            raise ValueError("max_inflight_requests must be >= 1")
