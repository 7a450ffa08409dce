"""Domain errors; the API maps each to its HTTP status and error code."""
from __future__ import annotations


class DomainError(Exception):
    def __init__(self, message: str, details: list[dict[str, str]] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or []


class NotFound(DomainError):
    pass


class Conflict(DomainError):
    pass


class InvalidRequest(DomainError):
    pass
