"""Trace context captured when the row is written (not when the relay sends it), so that the
consumer's span links to the business transaction. opentelemetry-api is optional."""

from __future__ import annotations

try:  # pragma: no cover - depends on what is installed
    from opentelemetry import propagate as _propagate
    from opentelemetry import trace as _trace

    _HAVE_OTEL = True
except ImportError:  # pragma: no cover
    _HAVE_OTEL = False


def trace_headers() -> list[tuple[str, str]]:
    """traceparent (and tracestate) of the active span, or [] without one."""
    if not _HAVE_OTEL:
        return []
    span = _trace.get_current_span()
    if not span.get_span_context().is_valid:
        return []
    carrier: dict[str, str] = {}
    _propagate.inject(carrier)
    return [(k, v) for k, v in carrier.items() if k in ("traceparent", "tracestate")]
