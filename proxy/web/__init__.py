"""
The HTTP API (Klein) and its OpenAPI description, and /metrics.
"""

from .api import MAX_BODY, OPENAPI_PATH, TokenAPI
from .metrics import METRICS_SCOPE, MetricsPage, MetricsSite

__all__ = ["MAX_BODY", "METRICS_SCOPE", "OPENAPI_PATH", "MetricsPage", "MetricsSite", "TokenAPI"]
