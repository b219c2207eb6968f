"""Test helpers for keymgr and for third-party providers.

:mod:`keymgr.testing.memory` holds in-memory implementations of the three
plug-in interfaces (``StateStore``, ``Backend``, ``Publisher``) with knobs to
make them fail, lag, revert, lose or tamper, for model-based tests of the real
reconciler. They are dumb storage: no keymgr logic is repeated in them.
"""
