"""API errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

from aiohttp import web

from mlxcluster.controller.http.responses import json_response


class ApiError(Exception):
    """An error the API answers with; raised anywhere below a route, rendered by the middleware."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.retry_after = retry_after

    def body(self) -> dict[str, object]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> web.Response:
        headers = {"Retry-After": str(max(1, round(self.retry_after)))} if self.retry_after is not None else None
        return json_response(self.body(), status=self.status, headers=headers)


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def model_not_found(model: str) -> ApiError:
    return ApiError(
        404, f"The model '{model}' does not exist or no worker serves it", param="model", code="model_not_found"
    )


def no_capacity(message: str, retry_after: float = 1.0) -> ApiError:
    return ApiError(503, message, type="server_error", code="no_capacity", retry_after=retry_after)


def payload_too_large(size: int, limit: int) -> ApiError:
    return ApiError(
        413,
        f"Request is {size} bytes encoded, larger than the NATS max_payload of {limit} bytes; "
        "shorten the prompt or raise nats.max_payload",
        code="payload_too_large",
    )
