"""Defaults shared by the nodes, the CLI and the tools."""

DEFAULT_CHUNK_SIZE = 1 << 20  # 1 MiB
MAX_CHUNK_SIZE = 64 << 20
DEFAULT_CHUNK_TIMEOUT = 5.0  # seconds

# Channel and topic the `fedstream node` command listens on for pushes and RID announcements.
DEFAULT_CHANNEL = "fedstream"
DEFAULT_PUSH_TOPIC = "file"
ANNOUNCE_TOPIC = "announce"
