#!/usr/bin/env python3
"""Writes deploy/rabbitmq-definitions.json: labbook's broker topology as a RabbitMQ definitions
file, for `rabbitmqctl import_definitions FILE`, the management UI's import, or the
`load_definitions` setting.

It mirrors what `labbook topology` declares (src/broker/topology.rs) with the default
LABBOOK_RETRY_DELAYS_MS=1000,10000,60000,600000. If a deployment sets other delays, regenerate
with the same list:  deploy/gen-rabbitmq-definitions.py --delays-ms 500,5000

The file holds no users or permissions: those are the broker operator's (and a user's password
is a secret). It holds one policy, labbook-delivery-limit: stage and dead-letter queues declared
by a labbook before version 3 have no x-delivery-limit argument (RabbitMQ cannot add one to an
existing queue), and on RabbitMQ 4.x a quorum queue's default limit of 20 deletes a message
returned more often; the policy gives them the limit labbook declares new queues with.
"""

import argparse
import json
import pathlib
import sys

EXCHANGE = "labbook"
EVENTS_EXCHANGE = "labbook.events"
STAGE_QUEUES = ["booking-created", "credentials-ready", "provision-due", "notify", "teardown-due"]
DEFAULT_DELAYS_MS = [1_000, 10_000, 60_000, 600_000]
VHOST = "/"
# Same as topology::DELIVERY_LIMIT: a limit no message reaches (labbook's own crash-loop guard
# dead-letters a message a worker keeps failing on long before).
DELIVERY_LIMIT = 1_000_000_000
POLICY = "labbook-delivery-limit"


def delay_queue_name(queue: str, ms: int) -> str:
    # Same rule as topology::delay_queue_name: whole seconds as "10s", otherwise "1500ms".
    return f"{queue}.retry.{ms // 1000}s" if ms % 1000 == 0 else f"{queue}.retry.{ms}ms"


def quorum_queue(name: str, extra: dict | None = None) -> dict:
    args = {"x-queue-type": "quorum"}
    args.update(extra or {})
    return {
        "name": name,
        "vhost": VHOST,
        "durable": True,
        "auto_delete": False,
        "arguments": args,
    }


def definitions(delays_ms: list[int]) -> dict:
    queues, bindings = [], []
    for q in STAGE_QUEUES:
        queues.append(quorum_queue(q, {"x-delivery-limit": DELIVERY_LIMIT}))
        bindings.append(
            {
                "source": EXCHANGE,
                "vhost": VHOST,
                "destination": q,
                "destination_type": "queue",
                "routing_key": q,
                "arguments": {},
            }
        )
        # Dead-letter queue: not bound; the workers publish to it by name.
        queues.append(quorum_queue(f"{q}.dlq", {"x-delivery-limit": DELIVERY_LIMIT}))
        # Retry tiers: a fixed TTL, then back to the stage queue through the default exchange.
        for ms in delays_ms:
            queues.append(
                quorum_queue(
                    delay_queue_name(q, ms),
                    {
                        "x-message-ttl": int(ms),
                        "x-dead-letter-exchange": "",
                        "x-dead-letter-routing-key": q,
                        "x-dead-letter-strategy": "at-least-once",
                        "x-overflow": "reject-publish",
                    },
                )
            )
    return {
        "vhosts": [{"name": VHOST}],
        "exchanges": [
            {
                "name": EXCHANGE,
                "vhost": VHOST,
                "type": "direct",
                "durable": True,
                "auto_delete": False,
                "internal": False,
                "arguments": {},
            },
            # The upstream's events (contract §7): labbook binds nothing to it.
            {
                "name": EVENTS_EXCHANGE,
                "vhost": VHOST,
                "type": "topic",
                "durable": True,
                "auto_delete": False,
                "internal": False,
                "arguments": {},
            },
        ],
        "queues": queues,
        "bindings": bindings,
        "policies": [
            {
                "vhost": VHOST,
                "name": POLICY,
                "pattern": "^(" + "|".join(STAGE_QUEUES) + r")(\.dlq)?$",
                "apply-to": "queues",
                "definition": {"delivery-limit": DELIVERY_LIMIT},
                "priority": 0,
            }
        ],
    }


def main() -> None:
    here = pathlib.Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--delays-ms",
        default=",".join(map(str, DEFAULT_DELAYS_MS)),
        help="the LABBOOK_RETRY_DELAYS_MS list (default: %(default)s)",
    )
    parser.add_argument(
        "--output",
        default=str(here / "rabbitmq-definitions.json"),
        help="the file to write, or - for standard output (default: %(default)s)",
    )
    opts = parser.parse_args()
    delays = [int(x) for x in opts.delays_ms.split(",") if x.strip()]
    text = json.dumps(definitions(delays), indent=2) + "\n"
    if opts.output == "-":
        sys.stdout.write(text)
    else:
        pathlib.Path(opts.output).write_text(text)
        print(f"wrote {opts.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
