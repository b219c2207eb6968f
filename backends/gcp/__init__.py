"""Google Cloud: the JWKS as a Cloud Storage object, the state as a Cloud Storage object.

- ``client.py``: where and how to reach Cloud Storage (Application Default
  Credentials, ``STORAGE_EMULATOR_HOST``), the lazily created client, retries
  and one-line error reasons with credentials scrubbed, bucket and object names.
- ``publisher.py``: :class:`~keymgr.backends.gcp.publisher.GCSPublisher`, type ``gcs``.
- ``store.py``: the ``gs://BUCKET/OBJECT`` state store, a
  :class:`~keymgr.docstore.DocumentAdapter` under :class:`~keymgr.docstore.SharedStore`.

Cloud KMS keys are not here yet: see ``docs/configuration/gcp.md``.
"""
