"""`fedstream serve` and `fedstream get` as a user runs them."""

import os
import signal

from tests.procs import run_cli_on_a_terminal
from tests.pull_support import make_file, sha256_of

MiB = 1 << 20


def serve_lines(proc, count):
    """The `<ref_id><TAB><path>` lines of a serve process, as {path: ref_id}."""
    lines = [proc.expect("", timeout=20) for _ in range(count)]
    return {path: ref for ref, path in (line.split("\t") for line in lines)}


def assert_one_line_error(proc, *fragments):
    code = proc.wait(30)
    assert code != 0
    lines = [line for line in proc.stderr_lines if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("fedstream: error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_serve_and_get_round_trip(procs, broker_address, tmp_path):
    files = [str(tmp_path / "a.bin"), str(tmp_path / "empty.bin")]
    digests = [make_file(files[0], 3 * MiB + 7), make_file(files[1], 0)]
    # a timeout no get can outlast, however loaded the machine: serve ends on Ctrl-C below
    serve = procs.fedstream("serve", *files, "--broker", broker_address, "--as", "owner", "--timeout", "300")
    refs = serve_lines(serve, 2)
    assert sorted(refs) == sorted(files)
    for path, digest in zip(files, digests):
        out = tmp_path / "out"
        get = procs.fedstream("get", refs[path], "--from", "owner", "--broker", broker_address, "-o", str(out))
        assert get.wait(30) == 0, get.stderr
        lines = get.remaining_stdout()
        assert lines[-1] == str(out / os.path.basename(path))
        assert sha256_of(lines[-1]) == digest
        assert get.stderr == ""  # no progress bar when stderr is not a terminal
    serve.signal(signal.SIGINT)
    assert serve.wait(30) == 0, serve.stderr


def test_serve_ends_by_itself_after_its_timeout_without_activity(procs, broker_address, tmp_path):
    src = str(tmp_path / "f.bin")
    make_file(src, 10)
    serve = procs.fedstream("serve", src, "--broker", broker_address, "--as", "owner", "--timeout", "1")
    serve_lines(serve, 1)
    assert serve.wait(30) == 0, serve.stderr


def test_serve_announces_to_nodes_and_ends_when_all_have_the_files(procs, broker_address, tmp_path):
    nodes = {}
    for site in ("site-1", "site-2"):
        nodes[site] = procs.fedstream("node", site, "--broker", broker_address, "--recv-dir", str(tmp_path / site))
        nodes[site].expect(f"ready\t{site}")
    files = [str(tmp_path / "model.pt"), str(tmp_path / "config.json")]
    digests = {os.path.basename(f): make_file(f, size) for f, size in zip(files, (2 * MiB, 1000))}
    serve = procs.fedstream("serve", *files, "--broker", broker_address, "--as", "server",
                            "--announce-to", "site-1,site-2", "--timeout", "60")
    assert len(serve_lines(serve, 2)) == 2
    assert serve.wait(60) == 0, serve.stderr
    for site, node in nodes.items():
        received = [node.expect("received\tpull\t", timeout=10).split("\t")[2] for _ in files]
        assert sorted(os.path.basename(p) for p in received) == sorted(digests)
        for path in received:
            assert os.path.dirname(path) == str(tmp_path / site)
            assert sha256_of(path) == digests[os.path.basename(path)]


def test_serve_fails_when_an_announced_node_is_missing(procs, broker_address, tmp_path):
    src = str(tmp_path / "f.bin")
    make_file(src, 10)
    serve = procs.fedstream("serve", src, "--broker", broker_address, "--announce-to", "ghost", "--timeout", "60")
    assert_one_line_error(serve, "ghost", "not connected")


def test_cli_errors_are_one_line(procs, broker_address, tmp_path):
    src = str(tmp_path / "f.bin")
    make_file(src, 10)
    serve = procs.fedstream("serve", src, "--broker", broker_address, "--as", "owner")
    ref = serve.expect("", timeout=20).split("\t")[0]
    cases = [
        (["serve", str(tmp_path / "missing.bin"), "--broker", broker_address], ["missing.bin", "does not exist"]),
        (["serve", src, "--broker", broker_address, "--timeout", "0"], ["--timeout must be positive"]),
        (["serve", src, "--broker", broker_address, "--announce-to", "bad name"], ["Invalid FQCN"]),
        (["get", "0123456789abcdef0123456789abcdef", "--from", "owner", "--broker", broker_address,
          "-o", str(tmp_path / "o")], ["unknown or expired reference"]),
        (["get", "../../etc/passwd", "--from", "owner", "--broker", broker_address], ["not a valid reference id"]),
        (["get", ref, "--from", "nobody", "--broker", broker_address, "--timeout", "1", "-o", str(tmp_path / "o")],
         ["'nobody' is not connected"]),
        (["get", ref, "--from", "owner", "--broker", broker_address, "-o", src], ["f.bin", "is not a directory"]),
    ]
    for args, fragments in cases:
        assert_one_line_error(procs.fedstream(*args), *fragments)


def test_get_progress_bar_on_a_terminal_and_quiet(procs, broker_address, tmp_path):
    src = str(tmp_path / "f.bin")
    make_file(src, 4 * MiB)
    serve = procs.fedstream("serve", src, "--broker", broker_address, "--as", "owner")
    ref = serve.expect("", timeout=20).split("\t")[0]
    outputs = {}
    for quiet in (False, True):
        code, stdout, outputs[quiet] = run_cli_on_a_terminal(
            "get", ref, "--from", "owner", "--broker", broker_address, "-o", str(tmp_path / f"out-{quiet}"),
            *(["--quiet"] if quiet else []))
        assert code == 0
        assert stdout.splitlines()[-1] == str(tmp_path / f"out-{quiet}" / "f.bin")
    assert "100%" in outputs[False] and "from owner" in outputs[False]
    assert outputs[True] == ""


def test_serve_ends_with_an_error_as_soon_as_an_announced_node_fails(procs, broker_address, tmp_path):
    recv_dir = tmp_path / "site-1"
    node = procs.fedstream("node", "site-1", "--broker", broker_address, "--recv-dir", str(recv_dir))
    node.expect("ready\tsite-1")
    recv_dir.rmdir()  # the node cannot store anything now
    src = str(tmp_path / "f.bin")
    make_file(src, 1000)
    serve = procs.fedstream("serve", src, "--broker", broker_address, "--announce-to", "site-1", "--timeout", "300")
    assert node.expect("failed\tpull\tf.bin\t", timeout=20)
    assert_one_line_error(serve, "'site-1' did not get")


def test_node_leaves_no_partial_file_when_an_announced_download_fails(procs, broker_address, tmp_path):
    from fedstream.common.constants import ANNOUNCE_TOPIC, DEFAULT_CHANNEL
    from fedstream.nodes import Cell

    recv = tmp_path / "recv"
    node = procs.fedstream("node", "site-1", "--broker", broker_address, "--recv-dir", str(recv))
    node.expect("ready")
    with Cell("liar", broker_address) as liar:  # announces a RID it does not serve
        liar.send_request(DEFAULT_CHANNEL, ANNOUNCE_TOPIC, "site-1",
                          {"kind": "pull", "files": [{"ref": "ab" * 16, "name": "x.bin"}]}, timeout=10)
        line = node.expect("failed\tpull", 30)
    assert "x.bin" in line
    assert os.listdir(recv) == []
