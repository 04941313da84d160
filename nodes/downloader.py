"""Pull file sharing (the seed's `FileDownloader` module).

The owner shares files with `FileDownloader` (nodes/pull_owner.py) and each recipient pulls them
at its own pace with `download_file` (nodes/pull_receiver.py); nodes/pull_wire.py is what they say.
"""

from nodes.pull_owner import FileDownloader
from nodes.pull_receiver import download_file

__all__ = ["FileDownloader", "download_file"]
