"""Pull recipient for the object tests: downloads objects by RID and reports what it got.

argv: broker, name, owner, allow_pickle ("true"/"false"), RIDs... Prints `RESULT <json>` per
RID with the error or the object's fingerprint, then `TEMP_LEFT <json list of the temp dir>`
and `PEAK <VmHWM bytes>`.
"""

import json
import os
import sys
import tempfile

from fedstream.nodes import Cell, download_object
from tests.helpers import objects_payloads as payloads


def main() -> None:
    broker, name, owner, allow_pickle = sys.argv[1:5]
    print("BASE", payloads.peak_rss_bytes(), flush=True)  # the interpreter with numpy and pyzmq loaded
    with Cell(name, broker) as cell:
        for ref in sys.argv[5:]:
            error, obj = download_object(owner, ref, 10, cell, allow_pickle=allow_pickle == "true")
            result = {"ref": ref, "error": error, "is_none": obj is None}
            if error is None:
                result["fingerprint"] = payloads.fingerprint(obj)
            del obj
            print("RESULT", json.dumps(result), flush=True)
    print("TEMP_LEFT", json.dumps(os.listdir(tempfile.gettempdir())), flush=True)
    print("PEAK", payloads.peak_rss_bytes(), flush=True)


if __name__ == "__main__":
    main()
