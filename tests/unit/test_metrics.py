"""L{dcrouter.ops.metrics}: what the services' live state becomes in the exposition."""

from __future__ import annotations

from types import SimpleNamespace

from prometheus_client import generate_latest

from dcrouter.ops.metrics import ServicesCollector, registryFor
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
