"""A Cell that echoes requests, for the bus tests: `python -m tests.helpers.bus_echo NAME BROKER`.

Topic "slow" waits the number of seconds given as payload before answering; every other
topic answers at once with who sent what. Prints "ready" once registered.
"""

import sys
import time

from fedstream.nodes import Cell, Message


def echo(message: Message) -> dict:
    """Answer with the sender, topic, payload and headers of `message`."""
    payload = message.payload
    if message.topic == "slow":
        time.sleep(float(payload))
    if isinstance(payload, bytes):
        payload = payload.decode()
    return {"source": message.source, "topic": message.topic, "payload": payload, "headers": message.headers}


def main() -> None:
    cell = Cell(sys.argv[1], sys.argv[2])
    cell.register_request_cb("test", "*", echo)
    cell.start()
    print("ready", flush=True)
    while True:
        time.sleep(1)


if __name__ == "__main__":
    main()
