"""``python tests/moto_atomic.py ARGS``: ``moto.server`` with S3's conditional
writes made atomic, as on S3.

moto checks ``If-Match`` / ``If-None-Match`` and then writes, in a threaded
server with no lock between the two (moto 5.2 ``S3Response.put_object`` and
``delete_object``): two conditional PUTs of one key sent at the same moment
can both pass the check and both succeed. S3 itself guarantees that only one
does, and keymgr's compare-and-swap relies on it. A test that races
processes on one state (tests/test_audit_store.py) once saw two commits of
the same audit sequence number that way, an outcome real S3 cannot produce.
Here every PUT and DELETE of an object runs under one lock, so a conditional
one is checked and applied as one step; everything else is moto as it is.
"""

from __future__ import annotations

import functools
import sys
import threading
from collections.abc import Callable
from typing import Any

from moto.s3 import responses
from moto.server import main

_WRITE = threading.Lock()


def _atomic(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        with _WRITE:
            return method(self, *args, **kwargs)

    return run


for _name in ("put_object", "delete_object"):
    setattr(responses.S3Response, _name, _atomic(getattr(responses.S3Response, _name)))

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
