"""A simulated FL site: takes the global model each round, "trains", offers its update.

Run as `python -m fedstream.nodes.simulate.site NAME --broker URL [--kit DIR]`; prints
"ready" once registered and runs until SIGTERM. One worker thread does the rounds in order:
get the model (pull by RID, or the object pushed for that round), apply `local_update`,
share the update in a transaction of its own, tell the server, and end the transaction as
soon as the server downloaded it.
"""

import argparse
import logging
import queue
import signal
import sys
import threading
from typing import Any, Optional

from fedstream.common.rc import DownloadStatus
from fedstream.nodes import Cell, FileDownloader, FileStreamer, FLContext, download_object
from fedstream.nodes.message import Message
from fedstream.nodes.simulate import fedavg, roles

log = logging.getLogger(__name__)

_DOWNLOAD_TIMEOUT = 30.0  # seconds the server may stay silent during one download
_SHARE_TIMEOUT = 120.0  # seconds an update stays shared without download activity
_REQUEST_TIMEOUT = 30.0


class Site:
    """The site's round loop; `on_*` methods are Cell callbacks, `_work` runs the rounds."""

    def __init__(self, cell: Cell) -> None:
        self.cell = cell
        self.fl_ctx = FLContext(cell)
        self._tasks: "queue.Queue[Optional[dict]]" = queue.Queue()
        self._pushed: dict[int, fedavg.Model] = {}
        self._pushed_ready = threading.Condition()
        self._worker = threading.Thread(target=self._work, name="sim-site", daemon=True)

    def start(self) -> None:
        self.cell.register_request_cb(roles.CHANNEL, roles.TOPIC_ROUND, self.on_round)
        self.cell.register_request_cb(roles.CHANNEL, roles.TOPIC_PING, lambda _msg: {"alive": True})
        FileStreamer.register_stream_processing(self.fl_ctx, roles.CHANNEL, roles.TOPIC_MODEL,
                                                stream_done_cb=self.on_model_pushed)
        self._worker.start()

    def stop(self) -> None:
        self._tasks.put(None)
        self._worker.join(10.0)

    def on_round(self, message: Message) -> dict:
        task = message.payload
        if not isinstance(task, dict) or not isinstance(task.get("round"), int):
            return {"accepted": False}
        self._tasks.put(task)
        return {"accepted": True}

    def on_model_pushed(self, stream_ctx: dict, _fl_ctx: FLContext) -> None:
        round_no = stream_ctx.get("round")
        model = FileStreamer.get_object(stream_ctx)
        if not isinstance(round_no, int) or model is None:
            log.warning("a pushed model arrived without a round number or failed: %s", FileStreamer.get_rc(stream_ctx))
            return
        with self._pushed_ready:
            self._pushed.setdefault(round_no, model)
            self._pushed_ready.notify_all()

    def _pushed_model(self, round_no: int, timeout: float) -> Optional[fedavg.Model]:
        with self._pushed_ready:
            self._pushed_ready.wait_for(lambda: round_no in self._pushed, timeout)
            for old in [r for r in self._pushed if r < round_no]:
                del self._pushed[old]
            return self._pushed.pop(round_no, None)

    def _work(self) -> None:
        while (task := self._tasks.get()) is not None:
            try:
                self._run_round(task)
            except Exception:  # one failed round must not end the site
                log.exception("round %s failed", task.get("round"))

    def _run_round(self, task: dict) -> None:
        round_no = task["round"]
        ref = task.get("ref")
        if isinstance(ref, str):
            error, model = download_object(roles.SERVER, ref, _DOWNLOAD_TIMEOUT, self.cell)
            if error is not None:
                log.error("round %d: could not get the model: %s", round_no, error)
                return
        else:
            model = self._pushed_model(round_no, _DOWNLOAD_TIMEOUT)
            if model is None:
                log.error("round %d: the pushed model did not arrive", round_no)
                return
        update = fedavg.local_update(model, self.cell.fqcn, round_no)
        done = threading.Event()
        tx_id = FileDownloader.new_transaction(self.cell, _SHARE_TIMEOUT, None)

        def downloaded(_ref: str, _to: str, status: Any, _name: str) -> None:
            if status != DownloadStatus.SUCCESS:
                log.warning("round %d: the server's download of the update failed", round_no)
            done.set()

        ref_id = FileDownloader.add_object(tx_id, update, file_downloaded_cb=downloaded)
        del model, update
        self.cell.send_request(roles.CHANNEL, roles.TOPIC_UPDATE, roles.SERVER,
                               {"round": round_no, "ref": ref_id, "samples": fedavg.sample_count(self.cell.fqcn)},
                               _REQUEST_TIMEOUT)
        done.wait(_SHARE_TIMEOUT)
        FileDownloader.delete_transaction(tx_id)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="fedstream.nodes.simulate.site")
    parser.add_argument("name")
    parser.add_argument("--broker", required=True)
    parser.add_argument("--kit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    cell_kwargs = {"kit": args.kit} if args.kit else {}
    with Cell(args.name, args.broker, **cell_kwargs) as cell:
        site = Site(cell)
        site.start()
        print("ready", flush=True)
        while not stop.wait(0.5):
            pass
        site.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
