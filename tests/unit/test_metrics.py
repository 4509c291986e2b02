"""L{dcrouter.ops.metrics}: what the services' live state becomes in the exposition."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from prometheus_client import generate_latest
from twisted.internet.address import IPv4Address
from twisted.logger import Logger, LogPublisher

from dcrouter.http.wire import RequestHeadParser
from dcrouter.ops import accesslog
from dcrouter.ops.accesslog import ConnectionRecord, RequestRecord
from dcrouter.ops.metrics import AccessCounter, RouterCollector, ServicesCollector, registryFor
from tests.unit.test_smtp_server import Session, makeFactory, transaction


def exposition(mail=None, dns=None):
    collector = ServicesCollector(lambda: (mail, dns, [], 0.0))
    return generate_latest(registryFor(collector)).decode()


def test_smtp_sessions_and_messages_per_port_and_mode():
    mx, submission = makeFactory(), makeFactory()
    session = Session(mx)
    session.replies()
    transaction(session, body="Subject: x\r\n\r\nok\r\n.\r\n")
    Session(mx).protocol.connectionLost(None)
    queue = SimpleNamespace(messages={"q1": None}, stats={"delivered": 3, "bounces": 1})
    text = exposition(SimpleNamespace(factories={25: mx, 587: submission}, queue=queue))
    assert 'dcrouter_smtp_sessions_active{mode="mx",port="25"} 1.0' in text
    assert 'dcrouter_smtp_sessions_total{mode="mx",port="25"} 2.0' in text
    assert 'dcrouter_smtp_sessions_total{mode="mx",port="587"} 0.0' in text
    assert 'dcrouter_smtp_sessions_refused_total{mode="mx",port="25"} 0.0' in text
    assert 'dcrouter_smtp_messages_total{mode="mx",port="25",result="accepted"} 1.0' in text
    assert 'dcrouter_smtp_messages_total{mode="mx",port="25",result="rejected"} 0.0' in text
    assert "dcrouter_mail_queue_messages 1.0" in text
    assert 'dcrouter_mail_events_total{event="delivered"} 3.0' in text
    assert 'dcrouter_mail_events_total{event="bounces"} 1.0' in text


def test_no_mail_no_smtp_metrics():
    assert "dcrouter_smtp" not in exposition()


def accessExposition() -> str:
    """
    The access metrics of a fixed set of records: the connection and request
    records as dcrouter writes them (given to the counter, and published
    too: counted once), and access events logged otherwise.
    """
    counter = AccessCounter()
    publisher = LogPublisher(counter)
    head = RequestHeadParser().feed(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n")
    client = IPv4Address("TCP", "10.0.0.1", 5000)
    endings = [None, "client closed", "refused: rate", "TLS handshake failed: x",
               "upstream failed: y", "idle timeout", "aborted: z", "upstream closed"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(accesslog.accessLog, "observer", publisher)
        patch.setattr(accesslog, "counters", [counter])
        for n, ended in enumerate(endings * 3):
            record = ConnectionRecord(0.0, client if n % 2 else None, 443 if n % 3 else 80)
            record.route = ("a", "b", None)[n % 3]
            record.bytesIn, record.bytesOut, record.ended = n, 10 * n, ended
            record.spliced = n % 4 == 0
            record.emit(1.0, "client left before routing")
        connection = SimpleNamespace(client=client, record=ConnectionRecord(0.0, client, 8080))
        for n, status in enumerate([200, 200, 404, None, 502, 200]):
            request = RequestRecord(0.0, connection, head)  # type: ignore[arg-type]
            request.route, request.status = ("a", None)[n % 2], status
            request.bytesOut = 100 * n
            request.emit(1.0)
    other = Logger(namespace="dcrouter.access", observer=publisher)
    other.info("x", port=443, route="a", ended="client closed", bytesIn="5", spliced=1)
    other.info("x", kind="request", route="a", status="200", bytesOut=7)
    other.info("x")
    Logger(namespace="elsewhere", observer=publisher).info("x", route="a", bytesIn=1)
    collector = RouterCollector(counter, lambda: (None, None))
    text = generate_latest(registryFor(collector)).decode()
    return "".join(line + "\n" for line in text.splitlines() if not line.startswith("#"))


ACCESS_EXPOSITION = """\
dcrouter_connections_closed_total{ended="closed",port="",route="-"} 1.0
dcrouter_connections_closed_total{ended="aborted",port="443",route="-"} 1.0
dcrouter_connections_closed_total{ended="closed",port="443",route="-"} 3.0
dcrouter_connections_closed_total{ended="refused",port="443",route="-"} 1.0
dcrouter_connections_closed_total{ended="timeout",port="443",route="-"} 1.0
dcrouter_connections_closed_total{ended="tls_failed",port="443",route="-"} 1.0
dcrouter_connections_closed_total{ended="upstream_failed",port="443",route="-"} 1.0
dcrouter_connections_closed_total{ended="closed",port="443",route="a"} 1.0
dcrouter_connections_closed_total{ended="aborted",port="443",route="b"} 1.0
dcrouter_connections_closed_total{ended="closed",port="443",route="b"} 3.0
dcrouter_connections_closed_total{ended="refused",port="443",route="b"} 1.0
dcrouter_connections_closed_total{ended="timeout",port="443",route="b"} 1.0
dcrouter_connections_closed_total{ended="tls_failed",port="443",route="b"} 1.0
dcrouter_connections_closed_total{ended="upstream_failed",port="443",route="b"} 1.0
dcrouter_connections_closed_total{ended="aborted",port="80",route="a"} 1.0
dcrouter_connections_closed_total{ended="closed",port="80",route="a"} 3.0
dcrouter_connections_closed_total{ended="refused",port="80",route="a"} 1.0
dcrouter_connections_closed_total{ended="timeout",port="80",route="a"} 1.0
dcrouter_connections_closed_total{ended="tls_failed",port="80",route="a"} 1.0
dcrouter_connections_closed_total{ended="upstream_failed",port="80",route="a"} 1.0
dcrouter_bytes_received_total{route="-"} 100.0
dcrouter_bytes_received_total{route="a"} 89.0
dcrouter_bytes_received_total{route="b"} 92.0
dcrouter_bytes_sent_total{route="-"} 1000.0
dcrouter_bytes_sent_total{route="a"} 840.0
dcrouter_bytes_sent_total{route="b"} 920.0
dcrouter_connections_spliced_total{route="-"} 2.0
dcrouter_connections_spliced_total{route="a"} 3.0
dcrouter_connections_spliced_total{route="b"} 2.0
dcrouter_http_requests_total{route="-",status="0"} 1.0
dcrouter_http_requests_total{route="-",status="200"} 2.0
dcrouter_http_requests_total{route="a",status="200"} 2.0
dcrouter_http_requests_total{route="a",status="404"} 1.0
dcrouter_http_requests_total{route="a",status="502"} 1.0
dcrouter_http_response_bytes_total{route="-"} 900.0
dcrouter_http_response_bytes_total{route="a"} 607.0
"""


def test_accessCounts() -> None:
    """
    Connections, bytes, splices and requests counted from the access records
    (the figures AccessCounter gave when it read every event's fields).
    """
    assert accessExposition() == ACCESS_EXPOSITION
