"""The fedstream broker: routes cell messages and fans out push chunks."""

from fedstream.broker.broker import Broker

__all__ = ["Broker"]
