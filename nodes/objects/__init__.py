"""Objects as files: Python values serialized once into a spool file that pull or push moves.

`container` owns the safe file format (plain values and numpy arrays, loaded without running
code; docs/PROTOCOL.md "Object container"), `spool` writes objects into files and loads them
back, with cloudpickle only by consent. The transfer side lives with each style:
`FileDownloader.add_object` (nodes/pull/owner.py), `download_object` (nodes/pull/objects.py)
and nodes/push/objects.py (stream_object, get_object); this package imports neither.
"""

from fedstream.nodes.objects.container import ObjectFormatError, PickleRefusedError, UnsupportedValueError
from fedstream.nodes.objects.spool import load_object, spool_object, write_object

__all__ = ["ObjectFormatError", "PickleRefusedError", "UnsupportedValueError", "load_object", "spool_object",
           "write_object"]
