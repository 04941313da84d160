"""Return codes and download statuses."""

from enum import Enum


class ReturnCode(str, Enum):
    """Outcome of an operation; the string value equals the name."""

    OK = "OK"
    ERROR = "ERROR"
    TIMEOUT = "TIMEOUT"
    TASK_ABORTED = "TASK_ABORTED"
    EXECUTION_EXCEPTION = "EXECUTION_EXCEPTION"
    BAD_REQUEST_DATA = "BAD_REQUEST_DATA"
    COMMUNICATION_ERROR = "COMMUNICATION_ERROR"

    def __str__(self) -> str:
        return self.value


class DownloadStatus(str, Enum):
    """Outcome of one recipient's download of one file."""

    SUCCESS = "success"
    FAILED = "failed"

    def __str__(self) -> str:
        return self.value
