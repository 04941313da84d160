"""Pull (the seed's `FileDownloader`): the owner shares files, each recipient downloads at its own pace.

`owner` serves transactions (`FileDownloader`), `recipient` downloads (`download_file`),
`announce` tells sites about RIDs, `wire` is what they say to each other (docs/PROTOCOL.md),
`objects` moves Python objects (`FileDownloader.add_object`, `download_object`).
"""

from fedstream.nodes.pull.objects import download_object
from fedstream.nodes.pull.owner import FileDownloader
from fedstream.nodes.pull.recipient import download_file

__all__ = ["FileDownloader", "download_file", "download_object"]
