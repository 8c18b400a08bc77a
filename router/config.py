"""The router's configuration."""

from __future__ import annotations

from dataclasses import dataclass, field

from tideserve.policy.routing import DEFAULT_KV_TRANSPORTS, parse_kv_transports


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
    max_inflight_batch: int = 0  # of those, at most this many batch-class; 0 = half
    max_body_bytes: int = 4 << 20  # larger bodies get 413
    max_redispatch: int = 2  # times a request may move to other workers before it fails
    redispatch_wait_s: float = 30.0  # how long a request whose worker died waits for another
    stats_window_s: float = 30.0  # the window /admin/stats rates and p90s cover
    migration: bool = False  # balance decode load by live-migrating running requests
    ttft_slo_s: float = 2.0  # partial mode: the TTFT a request's placement must meet
    macro_n_max: int = 4  # partial mode: a macro instance larger than this splits
    macro_n_min: int = 2  # partial mode: two macro instances smaller than this merge
    kv_transports: tuple[str, ...] = DEFAULT_KV_TRANSPORTS  # allowed, best first
    api_key: str = field(default="", repr=False)  # "" = open; else /v1/*, /admin/* need Bearer
    protect_metrics: bool = False  # /metrics also needs the API key
    curve_keys: str = ""  # CURVE key directory for the worker socket; "" = plaintext

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        if self.heartbeat_timeout_s <= 0 or self.request_timeout_s <= 0:
            raise ValueError("timeouts must be positive")
        if not 1 <= self.macro_n_min <= self.macro_n_max:
            raise ValueError("need 1 <= macro_n_min <= macro_n_max")
        if self.max_inflight_requests < 1:
            raise ValueError("max_inflight_requests must be >= 1")
        if not 0 <= self.max_inflight_batch <= self.max_inflight_requests:
            raise ValueError("max_inflight_batch must be in 0..max_inflight_requests")
        if self.api_key != "".join(self.api_key.split()):
            raise ValueError("api_key must not contain whitespace")
        if self.protect_metrics and not self.api_key:
            raise ValueError("protect_metrics needs an api_key")
        parse_kv_transports(self.kv_transports)  # an unknown name is a ValueError

    @property
    def admission_limits(self) -> dict[str, int]:
        """Requests admitted at once per SLO class: batch work is held to its share, so
        interactive requests always find room; interactive may use it all."""
        total = self.max_inflight_requests
        return {"interactive": total, "batch": self.max_inflight_batch or max(1, total // 2)}
