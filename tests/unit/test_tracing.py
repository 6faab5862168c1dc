"""The active span's trace context is captured into the headers when the event is written."""

import pytest

trace = pytest.importorskip("opentelemetry.trace", reason="opentelemetry-api not installed")

from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags  # noqa: E402

from outbox.message import build_message  # noqa: E402
from outbox.writer import with_trace  # noqa: E402

TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
SPAN_ID = 0x00F067AA0BA902B7


def active_span():
    ctx = SpanContext(TRACE_ID, SPAN_ID, is_remote=False, trace_flags=TraceFlags(1))
    return trace.use_span(NonRecordingSpan(ctx))


def test_traceparent_is_added_when_a_span_is_active():
    with active_span():
        headers = with_trace({"event-type": "X"})
    message = build_message(topic="t", payload={}, headers=headers)
    assert dict(message.headers)["traceparent"] == (
        b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    )
    assert dict(message.headers)["event-type"] == b"X"


def test_no_span_no_trace_header_and_given_traceparent_wins():
    assert with_trace({"a": "b"}) == {"a": "b"}
    with active_span():
        headers = with_trace([("traceparent", "given")])
    assert headers == [("traceparent", "given")]
