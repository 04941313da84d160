"""Argument validation and small shared pieces."""

import pytest

from fedstream.broker import Broker
from fedstream.common import DownloadStatus, ReturnCode, Signal, parse_size, validate_fqcn
from fedstream.common.filenames import commit_file, sanitize_name
from fedstream.nodes import Cell, FLContext


@pytest.mark.parametrize("name", ["server", "site-1", "site-1.job7", "a_b~c", "A.B.C"])
def test_valid_fqcns(name):
    assert validate_fqcn(name) == name


@pytest.mark.parametrize("name", ["", ".", "site-1.", ".site", "a..b", "site 1", "site/1", "s@x", None, 7,
                                  "x" * 300])
def test_invalid_fqcns_raise_value_error(name):
    with pytest.raises(ValueError, match="Invalid FQCN"):
        validate_fqcn(name)


def test_cell_and_broker_validate_their_arguments():
    with pytest.raises(ValueError, match="Invalid FQCN"):
        Cell("bad name", "tcp://127.0.0.1:5550")
    with pytest.raises(ValueError, match="expected SCHEME://ADDRESS"):
        Cell("site-1", "127.0.0.1:5550")
    with pytest.raises(ValueError, match="the scheme must be one of tcp, ipc, inproc"):
        Broker(bind="udp://127.0.0.1:5550")
    with pytest.raises(ValueError, match="needs a Cell"):
        FLContext("site-1")


@pytest.mark.parametrize("text,expected", [("0", 0), ("1", 1), ("256K", 256 << 10), ("1M", 1 << 20),
                                           ("2G", 2 << 30), ("1.5M", 3 << 19), ("64k", 64 << 10),
                                           ("8MiB", 8 << 20), (4096, 4096)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "M", "-1M", "1X", "1.3", "abc", -5, None, 1.5, True])
def test_bad_sizes_raise_value_error(text):
    with pytest.raises(ValueError, match="Invalid size"):
        parse_size(text)


def test_return_codes_and_statuses_are_strings():
    assert ReturnCode.OK == "OK" and ReturnCode.COMMUNICATION_ERROR == "COMMUNICATION_ERROR"
    assert {rc.value for rc in ReturnCode} == {rc.name for rc in ReturnCode}
    assert DownloadStatus.SUCCESS == "success" and DownloadStatus.FAILED == "failed"


def test_signal():
    sig = Signal()
    assert not sig.triggered
    sig.trigger("stop")
    assert sig.triggered and sig.value == "stop"
    sig.reset()
    assert not sig.triggered and sig.value is None


@pytest.mark.parametrize("raw,safe", [("../../x", "x"), ("/etc/passwd", "passwd"), ("..", "file"),
                                      (".hidden", "hidden"), ("a\x00b.txt", "a_b.txt"), ("C:\\a\\b.pt", "b.pt"),
                                      ("", "file"), ("model v2.pt", "model v2.pt")])
def test_sanitize_name_never_yields_a_path(raw, safe):
    assert sanitize_name(raw) == safe


def test_commit_file_never_overwrites(tmp_path):
    (tmp_path / "m.pt").write_bytes(b"old")
    for content in (b"new1", b"new2"):
        part = tmp_path / ".m.part"
        part.write_bytes(content)
        commit_file(str(part), str(tmp_path), "m.pt")
        assert not part.exists()
    assert (tmp_path / "m.pt").read_bytes() == b"old"
    assert (tmp_path / "m (1).pt").read_bytes() == b"new1"
    assert (tmp_path / "m (2).pt").read_bytes() == b"new2"
