"""Pull (the seed's `FileDownloader`): the owner shares files, each recipient downloads at its own pace.

`owner` serves transactions (`FileDownloader`), `recipient` downloads (`download_file`),
`announce` tells sites about RIDs, `wire` is what they say to each other (docs/PROTOCOL.md).
"""

from fedstream.nodes.pull.owner import FileDownloader
from fedstream.nodes.pull.recipient import download_file

__all__ = ["FileDownloader", "download_file"]
