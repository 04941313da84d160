"""Exceptions raised by fedstream."""


class FedstreamError(Exception):
    """Base class of every fedstream error."""


class CellError(FedstreamError):
    """A Cell could not do what was asked (not started, stopped, broker gone)."""


class ConnectionFull(CellError):
    """The Cell's connection to the broker has no room for another message now (a send told not to wait)."""


class RegistrationError(CellError):
    """The broker refused to register a Cell, or did not answer in time."""


class UnreachableError(FedstreamError):
    """The target FQCN is not connected to the broker."""


class BrokerUnreachableError(CellError):
    """The broker did not accept the message (it is down or the Cell is not registered)."""


class RequestTimeout(FedstreamError, TimeoutError):
    """No reply arrived within the request timeout."""


class RemoteError(FedstreamError):
    """The target received the request but answered with an error."""


class NoBrokerError(RegistrationError, BrokerUnreachableError):
    """Nothing accepted a connection at the broker address (no broker listens there)."""


class RegistrationTimeout(RegistrationError, TimeoutError):
    """A connection to the broker address was made, but no registration answer came in time."""
