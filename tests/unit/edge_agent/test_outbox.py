"""The agent's on-disk outbox (order, acknowledgement, the cap, restarts, concurrent writers) and
its sender (window, order across reconnects, refusals), with a fake client."""

from __future__ import annotations

import sqlite3
import threading
import time

import pytest

from edge_agent.outbox import Outbox, OutboxSender
from protocol import Channel, device_topic

TOPIC = device_topic("dev-1", Channel.UPDATE)


def _payloads(box: Outbox, after: int = 0) -> list[bytes]:
    return [e.payload for e in box.pending(after, limit=10_000)]


def test_pending_returns_messages_in_append_order_after_a_cursor(tmp_path):
    box = Outbox(tmp_path / "outbox.db")
    seqs = [box.append(TOPIC, f"m{i}".encode()) for i in range(5)]
    assert seqs == sorted(seqs) and len(set(seqs)) == 5
    assert _payloads(box) == [b"m0", b"m1", b"m2", b"m3", b"m4"]
    assert [e.payload for e in box.pending(seqs[1], limit=2)] == [b"m2", b"m3"]
    entry = box.pending(limit=1)[0]
    assert (entry.topic, entry.qos) == (TOPIC, 1)


def test_ack_deletes_only_the_acknowledged_messages(tmp_path):
    box = Outbox(tmp_path / "outbox.db")
    seqs = [box.append(TOPIC, f"m{i}".encode()) for i in range(4)]
    assert box.ack([seqs[0], seqs[2]]) == 2
    assert _payloads(box) == [b"m1", b"m3"]
    assert len(box) == 2
    assert box.ack([seqs[0]]) == 0  # acknowledged twice (or dropped meanwhile): a no-op
    assert box.ack([]) == 0
    assert box.size_bytes == 2 * (len(TOPIC) + 2)


def test_messages_survive_a_reopen_and_sequence_numbers_never_go_back(tmp_path):
    path = tmp_path / "outbox.db"
    box = Outbox(path)
    first = [box.append(TOPIC, f"m{i}".encode()) for i in range(3)]
    box.ack(first)  # emptied: a plain rowid would restart at 1 and fall behind a sender's cursor
    box.append(TOPIC, b"kept")
    box.close()

    again = Outbox(path)
    assert _payloads(again) == [b"kept"]
    assert len(again) == 1
    assert again.append(TOPIC, b"next") > max(first) + 1


def test_cap_by_count_drops_the_oldest_and_counts_drops_across_restarts(tmp_path):
    path = tmp_path / "outbox.db"
    box = Outbox(path, max_messages=3)
    for i in range(5):
        box.append(TOPIC, f"m{i}".encode())
    assert _payloads(box) == [b"m2", b"m3", b"m4"]
    assert box.dropped == 2
    box.close()

    again = Outbox(path, max_messages=3)
    again.append(TOPIC, b"m5")
    assert _payloads(again) == [b"m3", b"m4", b"m5"]
    assert again.dropped == 3


def test_cap_by_bytes_drops_as_many_old_messages_as_needed(tmp_path):
    size = len(TOPIC) + 100
    box = Outbox(tmp_path / "outbox.db", max_bytes=3 * size)
    for i in range(3):
        box.append(TOPIC, bytes([i]) * 100)
    assert box.dropped == 0
    big = box.append(TOPIC, b"x" * 250)  # needs the room of three small ones
    assert [e.seq for e in box.pending()] == [big]
    assert box.dropped == 3
    assert box.size_bytes == len(TOPIC) + 250
    with pytest.raises(ValueError, match="larger than the whole outbox"):
        box.append(TOPIC, b"x" * (4 * size))


def test_an_in_flight_message_dropped_by_the_cap_is_acknowledged_harmlessly(tmp_path):
    box = Outbox(tmp_path / "outbox.db", max_messages=2)
    sent = box.append(TOPIC, b"in flight")
    box.append(TOPIC, b"b")
    box.append(TOPIC, b"c")
    assert box.ack([sent]) == 0
    assert _payloads(box) == [b"b", b"c"]
    assert len(box) == 2


def test_appends_are_committed_before_append_returns(tmp_path):
    path = tmp_path / "outbox.db"
    box = Outbox(path)
    box.append(TOPIC, b"durable")
    # A second connection (another process, or the agent after a crash) sees it at once.
    other = sqlite3.connect(path)
    assert other.execute("SELECT payload FROM messages").fetchall() == [(b"durable",)]
    other.close()


def test_concurrent_appends_from_several_threads_keep_every_message_once(tmp_path):
    box = Outbox(tmp_path / "outbox.db")
    per_thread, threads = 50, 4

    def writer(n: int) -> None:
        for i in range(per_thread):
            box.append(TOPIC, f"{n}:{i}".encode())

    workers = [threading.Thread(target=writer, args=(n,)) for n in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    got = _payloads(box)
    assert len(got) == per_thread * threads == len(set(got)) == len(box)
    for n in range(threads):  # each writer's own messages stay in its order
        mine = [p for p in got if p.startswith(f"{n}:".encode())]
        assert mine == [f"{n}:{i}".encode() for i in range(per_thread)]


def test_in_memory_outbox_keeps_order(tmp_path):
    box = Outbox(None)
    for i in range(3):
        box.append(TOPIC, f"m{i}".encode())
    assert _payloads(box) == [b"m0", b"m1", b"m2"]


# -- the sender --------------------------------------------------------------------------------


class FakeClient:
    """Stands in for paho: records what it was given, hands out packet ids, can refuse."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.mids: dict[bytes, int] = {}
        self.refuse = False
        self._next = 100

    def publish(self, entry) -> int | None:
        if self.refuse:
            return None
        self._next += 1
        self.sent.append(entry.payload)
        self.mids[entry.payload] = self._next
        return self._next


def _sender(tmp_path, window=3):
    box = Outbox(tmp_path / "outbox.db")
    client = FakeClient()
    return box, client, OutboxSender(box, client.publish, window=window)


def _fill(box: Outbox, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        box.append(TOPIC, f"m{i}".encode())


def test_sender_waits_for_a_connection_then_sends_in_order_within_the_window(tmp_path):
    box, client, sender = _sender(tmp_path, window=3)
    _fill(box, 5)
    sender.handle([("wake",)])
    assert client.sent == []  # not connected: nothing leaves
    sender.handle([("connected",)])
    assert client.sent == [b"m0", b"m1", b"m2"]
    sender.handle([("ack", client.mids[b"m0"], None), ("ack", client.mids[b"m1"], None)])
    assert client.sent == [b"m0", b"m1", b"m2", b"m3", b"m4"]
    assert _payloads(box) == [b"m2", b"m3", b"m4"]  # only acknowledged ones are gone


def test_sender_ignores_acks_for_other_packets_and_drops_refused_ones(tmp_path):
    box, client, sender = _sender(tmp_path)
    _fill(box, 2)
    sender.handle([("connected",)])
    sender.handle([("ack", 9999, None)])  # e.g. the status message's PUBACK
    assert len(box) == 2 and sender.in_flight == 2
    sender.handle([("ack", client.mids[b"m0"], "Not authorized")])
    assert _payloads(box) == [b"m1"]  # a refusal is final: not sent again
    assert client.sent == [b"m0", b"m1"]


def test_after_a_reconnect_new_messages_wait_for_the_ones_still_in_flight(tmp_path):
    box, client, sender = _sender(tmp_path, window=3)
    _fill(box, 2)
    sender.handle([("connected",)])
    assert client.sent == [b"m0", b"m1"]
    sender.handle([("disconnected",)])
    _fill(box, 2, start=2)
    sender.handle([("connected",)])
    # The client re-sends m0 and m1 itself after the CONNACK; m2 must not overtake them.
    assert client.sent == [b"m0", b"m1"]
    sender.handle([("ack", client.mids[b"m0"], None)])
    assert client.sent == [b"m0", b"m1"]
    sender.handle([("ack", client.mids[b"m1"], None)])
    assert client.sent == [b"m0", b"m1", b"m2", b"m3"]  # not m0/m1 again: the client re-sent those


def test_after_a_reconnect_with_nothing_in_flight_sending_resumes_at_once(tmp_path):
    box, client, sender = _sender(tmp_path)
    sender.handle([("connected",), ("disconnected",)])
    _fill(box, 2)
    sender.handle([("wake",)])
    assert client.sent == []
    sender.handle([("connected",)])
    assert client.sent == [b"m0", b"m1"]


def test_a_message_the_client_cannot_take_is_offered_again(tmp_path):
    box, client, sender = _sender(tmp_path)
    _fill(box, 2)
    client.refuse = True
    sender.handle([("connected",)])
    assert client.sent == [] and sender.in_flight == 0
    client.refuse = False
    sender.handle([])  # the periodic tick
    assert client.sent == [b"m0", b"m1"]


def test_a_new_sender_starts_from_the_oldest_unacknowledged_message(tmp_path):
    box, client, sender = _sender(tmp_path)
    _fill(box, 3)
    sender.handle([("connected",), ("wake",)])
    sender.handle([("ack", client.mids[b"m0"], None)])
    # Process restart: m1 and m2 were sent but never acknowledged.
    restarted = FakeClient()
    again = OutboxSender(Outbox(box.path), restarted.publish, window=3)
    again.handle([("connected",)])
    assert restarted.sent == [b"m1", b"m2"]


def test_sender_thread_drains_and_stops(tmp_path):
    box, client, sender = _sender(tmp_path, window=2)
    _fill(box, 4)
    acks: list[int] = []
    original = client.publish

    def publish_and_ack(entry):
        mid = original(entry)
        acks.append(mid)
        sender.acked(mid)  # as paho's on_publish would, from another thread
        return mid

    sender._publish = publish_and_ack
    sender.start()
    sender.connected()
    deadline = time.monotonic() + 10
    while len(box) and time.monotonic() < deadline:
        time.sleep(0.01)
    sender.stop()
    assert client.sent == [b"m0", b"m1", b"m2", b"m3"]
    assert len(box) == 0
