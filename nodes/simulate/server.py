"""The simulated FL server: rounds of FedAvg over the object path, then a bit-for-bit check.

Run as `python -m fedstream.nodes.simulate.server --broker URL --sites a,b ...`. Each round:

1. Down: the global model goes to every live site, by pull (one transaction, one RID, each
   site downloads at its own pace) or by push (one stream to all; if a target fails, the
   push is retried with the sites still alive).
2. Up: every site announces its update's RID; the server downloads them concurrently to
   files and loads them one at a time into the FedAvg, in ascending site order (so arrival
   order never changes a bit, and only one update is in memory at once).
   A site that stops answering pings, or is not done by the round deadline, is left out of
   this round and of the rest of the run (FL with stragglers).
3. After the last round the server recomputes the whole run in one process without any
   transport (`fedavg.reference_run`) and compares bit for bit.

Progress goes to stdout as one JSON object per line (see `roles.EV_*`). Exit status: 0 all
sites in every round and equal; 3 equal but some site went missing; 1 otherwise.
"""

import argparse
import json
import logging
import os
import queue
import signal
import sys
import tempfile
import threading
import time
from typing import Any, Optional

from fedstream.common.errors import FedstreamError, UnreachableError
from fedstream.common.rc import DownloadStatus, ReturnCode
from fedstream.nodes import Cell, FileDownloader, FileStreamer, FLContext, download_file
from fedstream.nodes.message import Message
from fedstream.nodes.objects.container import ObjectFormatError
from fedstream.nodes.objects.spool import load_object
from fedstream.nodes.simulate import fedavg, roles

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_SITE_MISSING = 3

_DOWNLOAD_TIMEOUT = 30.0  # seconds a site may stay silent during one download
_PING_INTERVAL = 1.0
_PING_TIMEOUT = 3.0
_REQUEST_TIMEOUT = 10.0


def emit(event: str, **fields: Any) -> None:
    """One progress event on stdout."""
    print(json.dumps({"event": event, **fields}), flush=True)


class Round:
    """One round's bookkeeping: which sites hold the model, which updates arrived."""

    def __init__(self, number: int, sites: list[str]) -> None:
        self.number = number
        self.sites = sites
        self.started = time.monotonic()
        self.down_done: dict[str, float] = {}
        self.up_done: dict[str, float] = {}
        self.missing: dict[str, str] = {}
        self.updates: "queue.Queue[tuple[str, Optional[str], int, str]]" = queue.Queue()  # site, path, samples, error

    def waiting_for(self) -> list[str]:
        return [s for s in self.sites if s not in self.up_done and s not in self.missing]


class Server:
    """Drives the rounds; `run()` returns the exit status."""

    def __init__(self, cell: Cell, sites: list[str], rounds: int, size: int, layers: int, down: str,
                 round_timeout: float, spool_dir: str) -> None:
        self.cell = cell
        self.spool_dir = spool_dir
        self.fl_ctx = FLContext(cell)
        self.sites = sorted(sites)
        self.rounds = rounds
        self.size = size
        self.layers = layers
        self.down = down
        self.round_timeout = round_timeout
        self.alive = list(self.sites)
        self.participants: list[list[str]] = []
        self._round: Optional[Round] = None
        self._lock = threading.Lock()

    def run(self) -> int:
        self.cell.register_request_cb(roles.CHANNEL, roles.TOPIC_UPDATE, self.on_update)
        model: Optional[fedavg.Model] = fedavg.initial_model(self.size, self.layers)
        for number in range(1, self.rounds + 1):
            if not self.alive:
                emit(roles.EV_FINAL, verified=False, error="no site is left", missing=self._missing())
                return EXIT_FAILED
            holder = [model]
            del model  # the round drops the old model as soon as it is sent
            model = self._run_round(number, holder)
            if model is None:
                emit(roles.EV_FINAL, verified=False, error=f"round {number}: no site sent an update",
                     missing=self._missing())
                return EXIT_FAILED
        expected = fedavg.reference_run(self.size, self.layers, self.participants)
        verified = fedavg.models_equal(model, expected)
        missing = self._missing()
        emit(roles.EV_FINAL, verified=verified, missing=missing, model_bytes=fedavg.model_bytes(model),
             error=None if verified else "the final model differs from the one computed without transport")
        if not verified:
            return EXIT_FAILED
        return EXIT_SITE_MISSING if missing else EXIT_OK

    def _missing(self) -> list[str]:
        return [s for s in self.sites if s not in self.alive]

    # -- one round -------------------------------------------------------------------------
    def _run_round(self, number: int, holder: list[fedavg.Model]) -> Optional[fedavg.Model]:
        """One round; `holder` has the global model, which is released once it is sent."""
        current = Round(number, list(self.alive))
        with self._lock:
            self._round = current
        emit(roles.EV_ROUND_START, round=number, sites=current.sites)
        size = fedavg.model_bytes(holder[0])
        if self.down == "push":
            self._push_down(current, holder[0])
        else:
            self._pull_down(current, holder[0])
        holder.clear()
        down_end = time.monotonic()
        aggregator = fedavg.Aggregator()
        contributed: list[str] = []
        pending: dict[str, tuple[Optional[str], int, str]] = {}
        next_ping = time.monotonic() + _PING_INTERVAL
        deadline = current.started + self.round_timeout
        order = list(current.sites)
        while order:
            site = order[0]
            if site in current.missing:
                order.pop(0)
                continue
            if site in pending:
                path, samples, error = pending.pop(site)
                order.pop(0)
                if path is None:
                    self._lose(current, site, error)
                    continue
                try:
                    update = load_object(path)
                    if not isinstance(update, dict):
                        raise ValueError(f"expected a dict of arrays, got {type(update).__name__}")
                    aggregator.add(site, update, samples)
                    del update
                except (ObjectFormatError, ValueError, TypeError) as exc:
                    self._lose(current, site, f"sent an unusable update: {exc}")
                    continue
                finally:
                    os.remove(path)
                contributed.append(site)
                continue
            try:
                arrived, path, samples, error = current.updates.get(timeout=0.2)
                pending[arrived] = (path, samples, error)
            except queue.Empty:
                pass
            now = time.monotonic()
            if now >= deadline:
                for late in current.waiting_for():
                    self._lose(current, late, f"no update within {self.round_timeout:g} s")
            elif now >= next_ping:
                self._ping_waiting(current)
                next_ping = now + _PING_INTERVAL
        with self._lock:
            self._round = None
        if not contributed:
            return None
        self.participants.append(contributed)
        slowest = max(current.up_done, key=current.up_done.get) if current.up_done else None
        up_seconds = max(current.up_done.values(), default=down_end) - down_end
        down_seconds = max(current.down_done.values(), default=current.started) - current.started
        emit(roles.EV_ROUND_DONE, round=number, sites=contributed, missing=sorted(current.missing),
             bytes_down=size * len(current.down_done), bytes_up=size * len(contributed),
             seconds_down=round(down_seconds, 3), seconds_up=round(max(up_seconds, 0.0), 3),
             slowest=slowest)
        return aggregator.result()

    def _lose(self, current: Round, site: str, reason: str) -> None:
        if site in current.missing:
            return
        current.missing[site] = reason
        if site in self.alive:
            self.alive.remove(site)
        emit(roles.EV_SITE_MISSING, round=current.number, site=site, reason=reason)

    def _ping_waiting(self, current: Round) -> None:
        for site in current.waiting_for():
            try:
                self.cell.send_request(roles.CHANNEL, roles.TOPIC_PING, site, None, _PING_TIMEOUT)
            except UnreachableError:
                self._lose(current, site, "not connected")
            except FedstreamError as exc:
                self._lose(current, site, f"does not answer: {exc}")

    def _tell_round(self, current: Round, ref: Optional[str]) -> None:
        for site in list(current.sites):
            try:
                reply = self.cell.send_request(roles.CHANNEL, roles.TOPIC_ROUND, site,
                                               {"round": current.number, "ref": ref}, _REQUEST_TIMEOUT)
            except FedstreamError as exc:
                self._lose(current, site, f"cannot start the round: {exc}")
                continue
            if not isinstance(reply, dict) or reply.get("accepted") is not True:
                self._lose(current, site, "refused the round")

    def _pull_down(self, current: Round, model: fedavg.Model) -> None:
        def downloaded(_ref: str, to_site: str, status: Any, _name: str) -> None:
            if status == DownloadStatus.SUCCESS:
                current.down_done[to_site] = time.monotonic()
                emit(roles.EV_SITE_DOWN, round=current.number, site=to_site,
                     seconds=round(current.down_done[to_site] - current.started, 3))

        tx_id = FileDownloader.new_transaction(self.cell, self.round_timeout, None)
        ref = FileDownloader.add_object(tx_id, model, file_downloaded_cb=downloaded)
        self._tell_round(current, ref)
        self._end_transaction_later(tx_id, current)

    def _end_transaction_later(self, tx_id: str, current: Round) -> None:
        """End the round's transaction once every site has its model or is gone."""
        def wait_and_end() -> None:
            deadline = current.started + self.round_timeout
            while time.monotonic() < deadline:
                if all(s in current.down_done or s in current.missing for s in current.sites):
                    break
                time.sleep(0.1)
            FileDownloader.delete_transaction(tx_id)

        threading.Thread(target=wait_and_end, name=f"sim-round-{current.number}", daemon=True).start()

    def _push_down(self, current: Round, model: fedavg.Model) -> None:
        targets = list(current.sites)
        while targets:
            rc, ok = FileStreamer.stream_object(roles.CHANNEL, roles.TOPIC_MODEL, {"round": current.number},
                                                targets, model, self.fl_ctx)
            if ok:
                now = time.monotonic()
                for site in targets:
                    current.down_done[site] = now
                    emit(roles.EV_SITE_DOWN, round=current.number, site=site, seconds=round(now - current.started, 3))
                break
            log.warning("round %d: push to %s failed (%s); retrying with the sites still alive",
                        current.number, ", ".join(targets), rc)
            self._ping_waiting(current)
            remaining = [s for s in targets if s not in current.missing]
            if remaining == targets and rc != ReturnCode.OK:
                for site in targets:
                    self._lose(current, site, f"the push of the model failed ({rc})")
                return
            targets = remaining
        self._tell_round(current, None)

    # -- updates -----------------------------------------------------------------------------
    def on_update(self, message: Message) -> dict:
        info = message.payload
        with self._lock:
            current = self._round
        if (current is None or not isinstance(info, dict) or info.get("round") != current.number
                or message.source not in current.sites or not isinstance(info.get("ref"), str)
                or not isinstance(info.get("samples"), int) or info["samples"] <= 0):
            return {"accepted": False}
        threading.Thread(target=self._fetch, args=(current, message.source, info["ref"], info["samples"]),
                         name=f"sim-fetch-{message.source}", daemon=True).start()
        return {"accepted": True}

    def _fetch(self, current: Round, site: str, ref: str, samples: int) -> None:
        error, path = download_file(site, ref, _DOWNLOAD_TIMEOUT, self.cell, location=self.spool_dir,
                                    keep_partial=False)
        if error is None:
            current.up_done[site] = time.monotonic()
            emit(roles.EV_SITE_UP, round=current.number, site=site,
                 seconds=round(current.up_done[site] - current.started, 3))
        current.updates.put((site, path, samples, error or ""))


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="fedstream.nodes.simulate.server")
    parser.add_argument("--broker", required=True)
    parser.add_argument("--sites", required=True, help="comma-separated site names")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model-size", type=int, required=True)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--down", choices=["pull", "push"], default="pull")
    parser.add_argument("--round-timeout", type=float, default=120.0)
    parser.add_argument("--kit")
    parser.add_argument("--workdir", help="where downloaded updates wait to be aggregated (default: temp dir)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(EXIT_FAILED))
    cell_kwargs = {"kit": args.kit} if args.kit else {}
    with Cell(roles.SERVER, args.broker, **cell_kwargs) as cell, \
            tempfile.TemporaryDirectory(prefix="updates-", dir=args.workdir) as spool_dir:
        server = Server(cell, [s for s in args.sites.split(",") if s], args.rounds, args.model_size,
                        args.layers, args.down, args.round_timeout, spool_dir)
        return server.run()


if __name__ == "__main__":
    sys.exit(main())
