"""API-key authentication for the router's HTTP API.

With a key configured, a request reaches its handler only if it carries `Authorization:
Bearer <key>` or its route is open: /health and /openapi.json always, /metrics unless
`protect_metrics`. Everything else needs the key: /v1/* and /admin/*, /cluster (it lists
the workers' internal addresses and pids), and paths that match no route (a 401, not a 404,
so the routes cannot be probed). The decision uses the route aiohttp matched, not the raw
path. Keys are compared as SHA-256 digests in constant time; the key is never logged.
"""

from __future__ import annotations

import hashlib
import hmac

from aiohttp import web

from router.openai_api import ApiError

OPEN_PATHS = frozenset({"/health", "/openapi.json"})
METRICS_PATHS = frozenset({"/metrics"})


def is_open(route_path: str | None, protect_metrics: bool) -> bool:
    """Whether the route at `route_path` (None: no route matched) is served without a key."""
    if route_path in OPEN_PATHS:
        return True
    return route_path in METRICS_PATHS and not protect_metrics


def check_bearer(header: str | None, key_digest: bytes) -> ApiError | None:
    """None when `header` is `Bearer <the key>`, else the 401 to answer with."""
    if not header:
        return _unauthorized("missing API key: send the header 'Authorization: Bearer <key>'")
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return _unauthorized("the Authorization header must use the Bearer scheme")
    if not hmac.compare_digest(_digest(token.strip()), key_digest):
        return _unauthorized("incorrect API key")
    return None


def api_key_middleware(api_key: str, protect_metrics: bool):
    """The aiohttp middleware; it answers 401 itself (OpenAI-shaped, with WWW-Authenticate)."""
    key_digest = _digest(api_key)

    @web.middleware
    async def authenticate(request: web.Request, handler):
        resource = request.match_info.route.resource
        route_path = resource.canonical if resource is not None else None
        if not is_open(route_path, protect_metrics):
            err = check_bearer(request.headers.get("Authorization"), key_digest)
            if err is not None:
                headers = {"WWW-Authenticate": 'Bearer realm="tideserve"'}
                return web.json_response(err.body(), status=err.status, headers=headers)
        return await handler(request)

    return authenticate


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, message, "authentication_error", code="invalid_api_key")
