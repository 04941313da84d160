"""A server and a site component written against NVFlare 2.9's documented file-transfer API.

Only the imports changed. In NVFlare they read:

    from nvflare.apis.fl_constant import ReturnCode
    from nvflare.apis.fl_context import FLContext
    from nvflare.apis.streaming import StreamContext, StreamContextKey
    from nvflare.app_common.streamers.file_streamer import FileStreamer
    from nvflare.fuel.f3.streaming.download_service import DownloadStatus, TransactionDoneStatus
    from nvflare.fuel.f3.streaming.file_downloader import add_file, download_file
    from nvflare.fuel.f3.streaming.obj_downloader import ObjectDownloader

tests/test_compat_nvflare.py drives these classes on a real in-process federation.
"""

import threading

from fedstream.nodes.nvflare import (
    DownloadStatus,
    FileStreamer,
    FLContext,
    ObjectDownloader,
    ReturnCode,
    StreamContext,
    StreamContextKey,
    TransactionDoneStatus,
    add_file,
    download_file,
)

CHANNEL = "model_sharing"
TOPIC = "global_model"


class ModelSharer:
    """Server side: shares model files with the sites by download, and pushes small files."""

    def __init__(self):
        self.downloaded = []  # (to_receiver, status, file_name, round)
        self.tx_done = []  # (tx_id, status, objects, purpose)
        self.all_done = threading.Event()

    def share(self, fl_ctx: FLContext, file_names, sites, timeout=10.0):
        engine = fl_ctx.get_engine()
        cell = engine.get_cell()
        self.downloader = ObjectDownloader(
            cell=cell,
            timeout=timeout,
            num_receivers=len(sites),
            transaction_done_cb=self._transaction_done,
            purpose="model",
        )
        return [
            add_file(self.downloader, file_name, file_downloaded_cb=self._file_downloaded, round=3)
            for file_name in file_names
        ]

    def _file_downloaded(self, to_receiver: str, status: str, file_name: str, round: int):
        self.downloaded.append((to_receiver, status, file_name, round))

    def _transaction_done(self, tx_id: str, status: str, objects, purpose: str):
        self.tx_done.append((tx_id, status, list(objects), purpose))
        if status == TransactionDoneStatus.FINISHED:
            self.all_done.set()

    def push(self, fl_ctx: FLContext, file_name: str, sites):
        rc, ok = FileStreamer.stream_file(
            channel=CHANNEL,
            topic=TOPIC,
            stream_ctx={"round": 3},
            targets=sites,
            file_name=file_name,
            fl_ctx=fl_ctx,
            chunk_size=256 * 1024,
            chunk_timeout=0,
        )
        return rc == ReturnCode.OK and ok


class ModelReceiver:
    """Site side: registers for pushed files and downloads shared ones."""

    def __init__(self):
        self.chunks = []  # (return code of the reply, channel, topic)
        self.received = []  # (file location, rc, round, channel, topic)
        self.stream_done = threading.Event()

    def start(self, fl_ctx: FLContext, dest_dir: str):
        FileStreamer.register_stream_processing(
            fl_ctx=fl_ctx,
            channel=CHANNEL,
            topic=TOPIC,
            dest_dir=dest_dir,
            stream_done_cb=self._stream_done,
            chunk_consumed_cb=self._chunk_consumed,
            site="site",
        )

    def _chunk_consumed(self, reply, stream_ctx: StreamContext, fl_ctx: FLContext, **kwargs):
        self.chunks.append((reply.get_return_code(), stream_ctx.get(StreamContextKey.CHANNEL),
                            FileStreamer.get_topic(stream_ctx), kwargs.get("site")))

    def _stream_done(self, stream_ctx: StreamContext, fl_ctx: FLContext, **kwargs):
        self.received.append((FileStreamer.get_file_location(stream_ctx), stream_ctx.get(StreamContextKey.RC),
                              stream_ctx.get("round"), FileStreamer.get_channel(stream_ctx),
                              stream_ctx.get(StreamContextKey.TOPIC)))
        self.stream_done.set()

    def download(self, fl_ctx: FLContext, from_fqcn: str, ref_id: str, location: str):
        err, file_path = download_file(
            from_fqcn=from_fqcn,
            ref_id=ref_id,
            per_request_timeout=5.0,
            cell=fl_ctx.get_engine().get_cell(),
            location=location,
            abort_signal=fl_ctx.get_run_abort_signal(),
        )
        return err, file_path


def download_succeeded(status: str) -> bool:
    """How NVFlare code reads a download status."""
    return status == DownloadStatus.SUCCESS
