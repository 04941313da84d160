"""Broker addresses: tcp://HOST:PORT."""

from urllib.parse import urlsplit


def split_tcp_address(address: str) -> tuple[str, int]:
    """Split 'tcp://host:port' into (host, port); raise ValueError if it is not that shape."""
    parts = urlsplit(address)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme != "tcp" or not parts.hostname or port is None:
        raise ValueError(f"Invalid address {address!r}: expected tcp://HOST:PORT (e.g. tcp://127.0.0.1:5550).")
    return parts.hostname, port
