"""What runs inside a server or site process: Cell, FLContext and the file transfer features."""

from fedstream.nodes import aio
from fedstream.nodes.cell import Cell, PendingRequest
from fedstream.nodes.context import FLContext
from fedstream.nodes.message import Message, Reply
from fedstream.nodes.pull import FileDownloader, download_file, download_object
from fedstream.nodes.push import FileStreamer, StreamContext
from fedstream.nodes.simulate.local import LocalFederation

__all__ = ["Cell", "FLContext", "FileDownloader", "FileStreamer", "LocalFederation", "Message", "PendingRequest",
           "Reply", "StreamContext", "aio", "download_file", "download_object"]
