"""What runs inside a server or site process: Cell, FLContext and the file transfer features."""

from nodes.cell import Cell, PendingRequest
from nodes.context import FLContext
from nodes.downloader import FileDownloader, download_file
from nodes.message import Message, Reply
from nodes.streamer import FileStreamer, StreamContext

__all__ = ["Cell", "FLContext", "FileDownloader", "FileStreamer", "Message", "PendingRequest", "Reply",
           "StreamContext", "download_file"]
