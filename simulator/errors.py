"""Errors of the simulator.

Exception tree::

    SimulatorError
     ├── ConfigError          a setting (flag, constructor argument, POST /_sim/config) is invalid
     ├── ApiError             a request gets an OpenAI-style error reply (status + error body)
     └── SimulatorStartError  SimulatorServer's subprocess did not start or did not answer
"""

from __future__ import annotations

from typing import Any

__all__ = ["ApiError", "ConfigError", "SimulatorError", "SimulatorStartError"]


class SimulatorError(Exception):
    """Base of every error the simulator raises."""


class ConfigError(SimulatorError, ValueError):
    """A simulator setting is unknown or has a value of the wrong kind."""


class ApiError(SimulatorError):
    """An error reply in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class SimulatorStartError(SimulatorError, RuntimeError):
    """The simulator subprocess exited early or did not answer in time."""
