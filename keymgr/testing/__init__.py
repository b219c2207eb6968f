"""Test helpers for keymgr and for third-party providers.

- :mod:`keymgr.testing.conformance`: the conformance suites a plug-in runs,
  as pytest base classes: ``BackendTests``, ``PublisherTests`` and
  ``StoreTests`` (every built-in runs them in tests/test_conformance.py).
- :mod:`keymgr.testing.memory`: in-memory implementations of the three plug-in
  interfaces (``StateStore``, ``Backend``, ``Publisher``) with knobs to make
  them fail, lag, revert, lose or tamper, for model-based tests of the real
  reconciler. They are dumb storage: no keymgr logic is repeated in them.
- :mod:`keymgr.testing.docstore`: ``MemoryAdapter`` for the shared-document
  store, and ``SharedStoreTests``, the conformance suite a store adapter runs
  (tests/test_docstore.py, tests/test_docstore_real.py); it extends
  ``StoreTests``.
"""
