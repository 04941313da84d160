"""What runs inside a server or site process: Cell, FLContext and the file transfer features."""

from nodes.cell import Cell, PendingRequest
from nodes.context import FLContext
from nodes.message import Message, Reply

__all__ = ["Cell", "FLContext", "Message", "PendingRequest", "Reply"]
