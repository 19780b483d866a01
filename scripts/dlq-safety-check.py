#!/usr/bin/env python3
"""Does reading a quorum dead-letter queue without consuming it lose or reorder messages?

labbook's `dlq list` reads `<q>.dlq` (a quorum queue) with basic.get, acknowledges nothing and
closes the channel so the messages go back. On RabbitMQ 4.x quorum queues have a default
delivery-limit (20), and a message returned more often than that is dead-lettered, or dropped
when the queue has no dead-letter target. This check publishes a few dead letters to a fresh
queue, lists them many times with one way of reading (and queue arguments or policy), and
reports per case:
  safe          every listing saw every message, in order, with its properties, and all are left
  left          how many of the dead letters are still in the queue at the end
  max x-dc      the highest x-delivery-count header seen
  late arrival  where a dead letter published while a listing held the others shows up in the
                next listing: `last` (order kept) or the order seen (L = the late one)
and then checks re-declaring a .dlq with other arguments, and labbook's own queue arguments.

Usage (pika in a venv: python3 -m venv /tmp/v && /tmp/v/bin/pip install pika):
  dlq-safety-check.py [--url amqp://guest:guest@127.0.0.1:5672/%2f]
                      [--ctl "rabbitmqctl"] [--listings 30] [--messages 5] [CASE ...]

--ctl is how to run rabbitmqctl for that broker (e.g. "scripts/rabbitmq4.sh ctl"); the cases
that need a policy are skipped without it. Queues are named dlq-safety-check.* in the URL's
vhost and deleted afterwards; policies are named dlq-safety-check-* and removed afterwards.
Exit status 0 when the cases marked `expected safe` (the readings labbook may rely on: an
x-delivery-limit of i32::MAX by argument or policy, or rotation) were safe.
"""

import argparse
import json
import shlex
import subprocess
import sys
import time

import pika
from pika.exceptions import ChannelClosedByBroker

PREFIX = "dlq-safety-check."
BROKER_HEADERS = {"x-delivery-count", "x-acquired-count", "x-death", "x-first-death-exchange",
                  "x-first-death-queue", "x-first-death-reason", "x-last-death-exchange",
                  "x-last-death-queue", "x-last-death-reason"}
HUGE = 2**31 - 1  # i32::MAX: a signed 32-bit table value (lapin's AMQPValue::LongInt)


# --- ways of listing a queue: each returns the (properties, body) of every message seen -----
# `during` (if given) is called once while the listing holds messages: a dead letter arriving
# in the middle of a listing.

def noop():
    pass


def get_all(ch, q, during):
    out, tags = [], []
    while True:
        method, props, body = ch.basic_get(q, auto_ack=False)
        if method is None:
            break
        out.append((props, body))
        tags.append(method.delivery_tag)
    during()
    return out, tags


def list_get_close(conn, q, i, during=noop):
    """basic.get until empty, ack nothing, close the channel (labbook's `dlq list` today)."""
    ch = conn.channel()
    out, _ = get_all(ch, q, during)
    ch.close()
    return out


def list_get_nack(conn, q, i, during=noop):
    """basic.get until empty, then one basic.nack(multiple, requeue) of all, then close."""
    ch = conn.channel()
    out, tags = get_all(ch, q, during)
    if tags:
        ch.basic_nack(tags[-1], multiple=True, requeue=True)
    ch.close()
    return out


def list_get_reject(conn, q, i, during=noop):
    """basic.get until empty, then basic.reject(requeue) of each in order, then close."""
    ch = conn.channel()
    out, tags = get_all(ch, q, during)
    for t in tags:
        ch.basic_reject(t, requeue=True)
    ch.close()
    return out


def list_get_recover(conn, q, i, during=noop):
    """basic.get until empty, then basic.recover(requeue), then close."""
    ch = conn.channel()
    out, _ = get_all(ch, q, during)
    ch.basic_recover(requeue=True)
    ch.close()
    return out


def list_consume_close(conn, q, i, during=noop):
    """basic.consume with prefetch n, take the n messages counted, cancel, close the channel."""
    ch = conn.channel()
    count = ch.queue_declare(q, passive=True).method.message_count
    ch.basic_qos(prefetch_count=max(count, 1))
    out = []
    if count:
        for method, props, body in ch.consume(q, auto_ack=False, inactivity_timeout=5):
            if method is None:
                break
            out.append((props, body))
            if len(out) == count:
                break
    during()
    ch.cancel()
    ch.close()
    return out


def copy_props(props, keep_broker_headers):
    headers = dict(props.headers or {})
    if not keep_broker_headers:
        headers = {k: v for k, v in headers.items() if k not in BROKER_HEADERS}
    return pika.BasicProperties(
        content_type=props.content_type, content_encoding=props.content_encoding,
        headers=headers or None, delivery_mode=props.delivery_mode, priority=props.priority,
        correlation_id=props.correlation_id, reply_to=props.reply_to,
        expiration=props.expiration, message_id=props.message_id, timestamp=props.timestamp,
        type=props.type, user_id=props.user_id, app_id=props.app_id)


def rotate(conn, q, keep_broker_headers, during):
    """For the messages counted at the start: basic.get, publish a copy to the tail of the same
    queue (confirmed, mandatory), then ack the original."""
    ch = conn.channel()
    ch.confirm_delivery()
    count = ch.queue_declare(q, passive=True).method.message_count
    out = []
    for k in range(count):
        if k == count // 2:
            during()
        method, props, body = ch.basic_get(q, auto_ack=False)
        if method is None:
            break
        out.append((props, body))
        # Raises (and the channel closes, returning the original) if not confirmed or unroutable.
        ch.basic_publish("", q, body, copy_props(props, keep_broker_headers), mandatory=True)
        ch.basic_ack(method.delivery_tag)
    ch.close()
    return out


def list_rotate(conn, q, i, during=noop):
    return rotate(conn, q, False, during)


def list_rotate_verbatim(conn, q, i, during=noop):
    """Like rotate, but the copy keeps the x-delivery-count header the broker added."""
    return rotate(conn, q, True, during)


def list_returns_then_rotate(conn, q, i, during=noop):
    """3 listings as labbook does today (the broker counts them), then rotations."""
    return list_get_close(conn, q, i, during) if i <= 3 else rotate(conn, q, False, during)


def list_returns_then_rotate_verbatim(conn, q, i, during=noop):
    """Like returns_then_rotate, but the copies keep the broker's x-delivery-count header."""
    return list_get_close(conn, q, i, during) if i <= 3 else rotate(conn, q, True, during)


# --- cases ------------------------------------------------------------------------------------

QUORUM = {"x-queue-type": "quorum"}
CASES = [
    # name, queue arguments, policy definition (None: no policy), listing, expected safe
    ("get_close", QUORUM, None, list_get_close, False),
    ("get_nack", QUORUM, None, list_get_nack, False),
    ("get_reject", QUORUM, None, list_get_reject, False),
    ("get_recover", QUORUM, None, list_get_recover, False),
    ("consume_close", QUORUM, None, list_consume_close, False),
    ("rotate", QUORUM, None, list_rotate, True),
    ("rotate_verbatim", QUORUM, None, list_rotate_verbatim, False),
    ("close3_rotate", QUORUM, None, list_returns_then_rotate, True),
    ("close3_rotate_verbatim", QUORUM, None, list_returns_then_rotate_verbatim, False),
    ("arg_limit_-1", {**QUORUM, "x-delivery-limit": -1}, None, list_get_close, False),
    ("arg_limit_huge", {**QUORUM, "x-delivery-limit": HUGE}, None, list_get_close, True),
    ("policy_limit_-1", QUORUM, {"delivery-limit": -1}, list_get_close, False),
    ("policy_limit_huge", QUORUM, {"delivery-limit": HUGE}, list_get_close, True),
    ("oppolicy_limit_-1", QUORUM, ("operator", {"delivery-limit": -1}), list_get_close, False),
    ("oppolicy_limit_huge", QUORUM, ("operator", {"delivery-limit": HUGE}), list_get_close, True),
]


def publish_letters(conn, q, n):
    ch = conn.channel()
    ch.confirm_delivery()
    for i in range(n):
        props = pika.BasicProperties(
            content_type="application/json", delivery_mode=2, message_id=f"m{i}",
            timestamp=1_700_000_000 + i,
            headers={"x-labbook-error": f"error {i}", "x-labbook-stage": "notify",
                     "x-labbook-attempts": 3, "x-labbook-failed-at": "2025-01-01T00:00:00Z"})
        ch.basic_publish("", q, f'{{"booking_id":"b{i}"}}'.encode(), props, mandatory=True)
    ch.close()


def depth(conn, q):
    ch = conn.channel()
    try:
        return ch.queue_declare(q, passive=True).method.message_count
    finally:
        ch.close()


def wait_depth(conn, q, want, timeout=3.0):
    """Returns settle asynchronously after a channel closes: wait for the count to come back."""
    end = time.monotonic() + timeout
    while True:
        d = depth(conn, q)
        if d >= want or time.monotonic() > end:
            return d
        time.sleep(0.05)


def strip(props):
    return {k: v for k, v in (props.headers or {}).items() if k not in BROKER_HEADERS}


def run_case(conn, ctl, case, n, listings):
    name, args, policy, lister, _ = case
    q = PREFIX + name
    result = {"case": name}
    ch = conn.channel()
    ch.queue_delete(q)
    ch.close()
    pol_name = None
    if policy is not None:
        kind, definition = policy if isinstance(policy, tuple) else ("user", policy)
        if ctl is None:
            result["skipped"] = "needs --ctl"
            return result
        pol_name = f"dlq-safety-check-{name}"
        cmd = "set_operator_policy" if kind == "operator" else "set_policy"
        p = subprocess.run(ctl + [cmd, "--apply-to", "queues", "--priority", "100", pol_name,
                                  "^" + q.replace(".", r"\.") + "$", json.dumps(definition)],
                           capture_output=True, text=True)
        if p.returncode != 0:
            result["declare"] = "policy refused: " + (p.stderr or p.stdout).strip().splitlines()[-1]
            return result
    try:
        try:
            ch = conn.channel()
            ch.queue_declare(q, durable=True, arguments=args)
            ch.close()
        except ChannelClosedByBroker as e:
            result["declare"] = f"refused {e.reply_code} {e.reply_text}"
            return result
        result["declare"] = "ok"
        if policy is not None:
            time.sleep(1.0)  # policies apply asynchronously
        publish_letters(conn, q, n)
        want = [f'{{"booking_id":"b{i}"}}'.encode() for i in range(n)]
        wait_depth(conn, q, n)
        first = None
        original = None
        max_count = 0
        counts = []
        for i in range(1, listings + 1):
            seen = lister(conn, q, i)
            bodies = [b for _, b in seen]
            if original is None:
                original = [(strip(p), p.message_id, p.timestamp, p.content_type) for p, _ in seen]
            dc = [int((p.headers or {}).get("x-delivery-count", 0)) for p, _ in seen]
            max_count = max([max_count] + dc)
            counts.append(dc[0] if dc else None)
            same_props = [(strip(p), p.message_id, p.timestamp, p.content_type)
                          for p, _ in seen] == original
            if first is None and (bodies != want or not same_props):
                what = "reordered" if sorted(bodies) == sorted(want) else f"saw {len(bodies)}/{n}"
                if bodies == want:
                    what = "properties changed"
                first = f"listing {i}: {what}"
            wait_depth(conn, q, len(seen))
        result["left"] = wait_depth(conn, q, n)
        result["late"] = check_late_arrival(conn, q, n, lister)
        result["first_problem"] = first or "-"
        result["max_x_delivery_count"] = max_count
        result["x_delivery_count_trace"] = counts
        result["safe"] = first is None and result["left"] == n
        return result
    finally:
        ch = conn.channel()
        ch.queue_delete(q)
        ch.close()
        if pol_name:
            cmd = "clear_operator_policy" if isinstance(policy, tuple) else "clear_policy"
            subprocess.run(ctl + [cmd, pol_name], capture_output=True)


def check_late_arrival(conn, q, n, lister):
    """A dead letter arriving while a listing holds the others: is it listed last afterwards?"""
    ch = conn.channel()
    ch.queue_purge(q)
    ch.close()
    publish_letters(conn, q, n)
    wait_depth(conn, q, n)

    def late():
        ch = conn.channel()
        ch.confirm_delivery()
        ch.basic_publish("", q, b"late", pika.BasicProperties(delivery_mode=2), mandatory=True)
        ch.close()

    lister(conn, q, 100, late)  # listing numbers past any warm-up of the case
    wait_depth(conn, q, n + 1)
    seen = [b for _, b in lister(conn, q, 101)]
    names = " ".join("L" if b == b"late" else b.decode().rsplit('"b', 1)[1].rstrip('"}')
                     for b in seen)
    return "last" if seen == [f'{{"booking_id":"b{i}"}}'.encode() for i in range(n)] + [b"late"] \
        else names


def try_declare(conn, q, args):
    try:
        ch = conn.channel()
        ch.queue_declare(q, durable=True, arguments=args)
        ch.close()
        return "ok"
    except ChannelClosedByBroker as e:
        return f"refused {e.reply_code} {e.reply_text}"


def check_declarations(conn):
    """Re-declaring a .dlq with other arguments, and labbook's own queue arguments."""
    retry = {**QUORUM, "x-message-ttl": 200, "x-dead-letter-exchange": "",
             "x-dead-letter-routing-key": PREFIX + "stage",
             "x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"}
    checks = [
        ("declared without, re-declared with x-delivery-limit=-1",
         [QUORUM, {**QUORUM, "x-delivery-limit": -1}]),
        (f"declared without, re-declared with x-delivery-limit={HUGE}",
         [QUORUM, {**QUORUM, "x-delivery-limit": HUGE}]),
        (f"declared with x-delivery-limit={HUGE}, re-declared without",
         [{**QUORUM, "x-delivery-limit": HUGE}, QUORUM]),
        ("labbook stage/.dlq queue (x-queue-type=quorum)", [QUORUM]),
        ("labbook retry tier (ttl, dlx, at-least-once, reject-publish)", [retry]),
    ]
    q = PREFIX + "declare"
    for what, steps in checks:
        ch = conn.channel()
        ch.queue_delete(q)
        ch.close()
        outcome = [try_declare(conn, q, args) for args in steps]
        print(f"  {what}: {' then '.join(outcome)}")
    ch = conn.channel()
    ch.queue_delete(q)
    ch.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/%2f")
    ap.add_argument("--ctl", help='how to run rabbitmqctl, e.g. "scripts/rabbitmq4.sh ctl"')
    ap.add_argument("--listings", type=int, default=30)
    ap.add_argument("--messages", type=int, default=5)
    ap.add_argument("--trace", action="store_true", help="print x-delivery-count per listing")
    ap.add_argument("cases", nargs="*", help="case names (default: all)")
    a = ap.parse_args()
    ctl = shlex.split(a.ctl) if a.ctl else None
    cases = [c for c in CASES if not a.cases or c[0] in a.cases]
    conn = pika.BlockingConnection(pika.URLParameters(a.url))
    version = conn._impl.server_properties.get("version", "?")
    version = version.decode() if isinstance(version, bytes) else version
    print(f"broker {version} at {a.url}: "
          f"{a.messages} dead letters, {a.listings} listings per case")
    print(f"{'case':<22} {'declare':<8} {'safe':<5} {'left':>4} {'max x-dc':>8}  "
          f"{'late arrival':<12}  first problem")
    ok = True
    for case in cases:
        r = run_case(conn, ctl, case, a.messages, a.listings)
        if "skipped" in r:
            print(f"{r['case']:<22} skipped ({r['skipped']})")
            continue
        if r.get("declare") != "ok":
            print(f"{r['case']:<22} {r['declare']}")
            ok = ok and not case[4]
            continue
        print(f"{r['case']:<22} {r['declare']:<8} {str(r['safe']).lower():<5} {r['left']:>4} "
              f"{r['max_x_delivery_count']:>8}  {r['late']:<12}  {r['first_problem']}")
        if a.trace:
            print(f"{'':<22} x-delivery-count of the first message per listing: "
                  f"{r['x_delivery_count_trace']}")
        if case[4] and not r["safe"]:
            ok = False
    if not a.cases:
        print("declarations:")
        check_declarations(conn)
    conn.close()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
