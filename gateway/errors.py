"""The gateway's error tree; one middleware (``gateway.middlewares``) turns it into HTTP.

    GatewayError                 500 api_error
    ├── BadRequest               400 invalid_request_error   (message says which field)
    ├── Unauthorized             401 authentication_error
    ├── InsufficientCredit       402 billing_error / insufficient_credit
    ├── Forbidden                403 permission_error
    ├── NotFound                 404 not_found_error          (unknown model, key, bucket)
    ├── MethodNotAllowed         405 invalid_request_error
    ├── UpgradeRequired          426 invalid_request_error    (a WebSocket asked for; Codex falls back)
    ├── Conflict                 409 invalid_request_error    (a refused state change)
    ├── PayloadTooLarge          413 request_too_large
    ├── TooManyRequests          429 rate_limit_error
    ├── UpstreamError            502 api_error
    ├── UpstreamTimeout          504 timeout_error
    └── ServiceUnavailable       503 overloaded_error

Messages are written for the user and must never carry request or response content: only field
names, ids and counts.
"""

from __future__ import annotations

__all__ = [
    "BadRequest",
    "Conflict",
    "Forbidden",
    "GatewayError",
    "InsufficientCredit",
    "MethodNotAllowed",
    "NotFound",
    "PayloadTooLarge",
    "ServiceUnavailable",
    "TooManyRequests",
    "Unauthorized",
    "UpgradeRequired",
    "UpstreamError",
    "UpstreamTimeout",
]


class GatewayError(Exception):
    status = 500
    # Anthropic's error.type; OpenAI's error.type is derived from it in the renderer.
    anthropic_type = "api_error"
    openai_type = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        fields: dict[str, int | str] | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers or {}
        # Machine-readable facts riding beside `message` in the error object (ids and amounts only).
        self.fields = fields or {}


class BadRequest(GatewayError):
    status = 400
    anthropic_type = "invalid_request_error"
    openai_type = "invalid_request_error"


class Unauthorized(GatewayError):
    status = 401
    anthropic_type = "authentication_error"
    openai_type = "invalid_request_error"
    code = "invalid_api_key"


class InsufficientCredit(GatewayError):
    status = 402
    anthropic_type = "billing_error"
    openai_type = "insufficient_quota"
    code = "insufficient_credit"


class Forbidden(GatewayError):
    status = 403
    anthropic_type = "permission_error"
    openai_type = "permission_error"


class MethodNotAllowed(GatewayError):
    status = 405
    anthropic_type = "invalid_request_error"
    openai_type = "invalid_request_error"
    code = "method_not_allowed"


class UpgradeRequired(GatewayError):
    status = 426
    anthropic_type = "invalid_request_error"
    openai_type = "invalid_request_error"
    code = "upgrade_required"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"Upgrade": "HTTP/1.1", "Connection": "Upgrade"})


class NotFound(GatewayError):
    status = 404
    anthropic_type = "not_found_error"
    openai_type = "invalid_request_error"
    code = "not_found"


class Conflict(GatewayError):
    status = 409
    anthropic_type = "invalid_request_error"
    openai_type = "invalid_request_error"
    code = "conflict"


class PayloadTooLarge(GatewayError):
    status = 413
    anthropic_type = "request_too_large"
    openai_type = "invalid_request_error"
    code = "request_too_large"


class TooManyRequests(GatewayError):
    status = 429
    anthropic_type = "rate_limit_error"
    openai_type = "rate_limit_error"
    code = "too_many_concurrent_requests"


class UpstreamError(GatewayError):
    status = 502
    anthropic_type = "api_error"
    openai_type = "server_error"
    code = "upstream_error"


class UpstreamTimeout(GatewayError):
    status = 504
    anthropic_type = "timeout_error"
    openai_type = "server_error"
    code = "upstream_timeout"


class ServiceUnavailable(GatewayError):
    status = 503
    anthropic_type = "overloaded_error"
    openai_type = "server_error"
    code = "unavailable"
