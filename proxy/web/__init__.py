"""
The HTTP API (Klein) and its OpenAPI description.
"""

from .api import MAX_BODY, OPENAPI_PATH, TokenAPI

__all__ = ["MAX_BODY", "OPENAPI_PATH", "TokenAPI"]
