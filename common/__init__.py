"""Pieces shared by the broker and the nodes: names, wire protocol, return codes, errors."""

from fedstream.common.errors import (
    BrokerUnreachableError,
    CellError,
    ConnectionFull,
    FedstreamError,
    RegistrationError,
    RemoteError,
    RequestTimeout,
    UnreachableError,
)
from fedstream.common.fqcn import validate_fqcn
from fedstream.common.rc import DownloadStatus, ReturnCode
from fedstream.common.signal import Signal
from fedstream.common.sizes import format_size, parse_size

__all__ = [
    "BrokerUnreachableError",
    "CellError",
    "ConnectionFull",
    "DownloadStatus",
    "FedstreamError",
    "RegistrationError",
    "RemoteError",
    "RequestTimeout",
    "ReturnCode",
    "Signal",
    "UnreachableError",
    "format_size",
    "parse_size",
    "validate_fqcn",
]
