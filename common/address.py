"""ZeroMQ endpoints: parsing `tcp://`, `ipc://` and `inproc://` URLs and deriving fan-out endpoints.

The broker binds one message endpoint and two fan-out endpoints (chunks in, chunks out).
When the fan-out endpoints are not given they are derived from the message endpoint:
`tcp://H:P` -> `tcp://H:P+1`, `tcp://H:P+2` (port 0 -> free ports), `ipc:///x.sock` ->
`ipc:///x-in.sock`, `ipc:///x-out.sock`, `inproc://name` -> `inproc://name-in`, `-out`.
A TCP endpoint advertised with the host `*` means "the host the node reached the broker on".
"""

from dataclasses import dataclass
from typing import Optional

SCHEMES = ("tcp", "ipc", "inproc")
WILDCARD_HOSTS = ("*", "0.0.0.0", "::", "")
MAX_ENDPOINT_LENGTH = 1024


@dataclass(frozen=True)
class Endpoint:
    """One parsed endpoint: `scheme` plus either (`host`, `port`) for tcp or `path` otherwise."""

    scheme: str
    host: str = ""
    port: int = 0
    path: str = ""

    @property
    def is_ipv6(self) -> bool:
        """True for a tcp endpoint whose host is an IPv6 literal (written in brackets)."""
        return self.scheme == "tcp" and ":" in self.host

    def url(self) -> str:
        """The endpoint as a ZeroMQ URL (IPv6 hosts in brackets)."""
        if self.scheme != "tcp":
            return f"{self.scheme}://{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{self.port}"

    def with_host(self, host: str) -> "Endpoint":
        """The same tcp endpoint on another host."""
        return Endpoint("tcp", host, self.port)

    def with_port(self, port: int) -> "Endpoint":
        """The same tcp endpoint on another port."""
        return Endpoint("tcp", self.host, port)


def _invalid(address: object, why: str) -> ValueError:
    return ValueError(f"Invalid address {str(address)[:200]!r}: {why} (e.g. tcp://127.0.0.1:5550, "
                      f"tcp://[::1]:5550, ipc:///tmp/fed.sock or inproc://fed).")


def parse_endpoint(address: object) -> Endpoint:
    """Parse a ZeroMQ URL; raise ValueError with one sentence if it is not a usable endpoint."""
    if not isinstance(address, str) or "://" not in address:
        raise _invalid(address, "expected SCHEME://ADDRESS")
    if len(address) > MAX_ENDPOINT_LENGTH:
        raise _invalid(address, f"longer than {MAX_ENDPOINT_LENGTH} characters")
    scheme, rest = address.split("://", 1)
    if scheme not in SCHEMES:
        raise _invalid(address, f"the scheme must be one of {', '.join(SCHEMES)}")
    if scheme != "tcp":
        if not rest or any(ord(c) < 32 for c in rest):
            raise _invalid(address, f"{scheme}:// needs a name")
        return Endpoint(scheme, path=rest)
    host, sep, port_text = rest.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) < 65536:
        raise _invalid(address, "expected tcp://HOST:PORT")
    if host.startswith("["):
        if not host.endswith("]") or ":" not in host:
            raise _invalid(address, "an IPv6 host needs brackets, e.g. tcp://[::1]:5550")
        host = host[1:-1]
    elif ":" in host:
        raise _invalid(address, "an IPv6 host needs brackets, e.g. tcp://[::1]:5550")
    if not host or any(c in host for c in "/@ ") or any(ord(c) < 32 for c in host):
        raise _invalid(address, "expected tcp://HOST:PORT")
    return Endpoint("tcp", host, int(port_text))


def derive_fanout(bind: Endpoint) -> tuple[Endpoint, Endpoint]:
    """The default (in, out) fan-out endpoints next to the message endpoint `bind`."""
    if bind.scheme == "tcp":
        if bind.port == 0:
            return bind, bind
        if bind.port + 2 > 65535:
            raise ValueError(f"The fan-out ports after {bind.url()} do not exist; choose them with "
                             f"--fanout-in/--fanout-out.")
        return bind.with_port(bind.port + 1), bind.with_port(bind.port + 2)
    stem, dot, ext = bind.path.rpartition(".")
    if bind.scheme == "ipc" and dot and "/" not in ext and stem and not stem.endswith("/"):
        return Endpoint("ipc", path=f"{stem}-in.{ext}"), Endpoint("ipc", path=f"{stem}-out.{ext}")
    return Endpoint(bind.scheme, path=f"{bind.path}-in"), Endpoint(bind.scheme, path=f"{bind.path}-out")


def reachable(endpoint: Endpoint, via: Optional[Endpoint] = None) -> Endpoint:
    """Where a node connects to reach `endpoint`: a wildcard tcp host becomes `via`'s host (or loopback)."""
    if endpoint.scheme != "tcp" or endpoint.host not in WILDCARD_HOSTS:
        return endpoint
    if via is not None and via.scheme == "tcp" and via.host not in WILDCARD_HOSTS:
        return endpoint.with_host(via.host)
    return endpoint.with_host("::1" if endpoint.host == "::" else "127.0.0.1")
