"""One PKCS#11 session per token and process, and every PKCS#11 failure as one line.

PKCS#11 logs in per application, not per session: ``C_Logout``, or closing
the last session, logs every session of the process out. So all backends on
one token (one module and one token label or slot) in a process share one
:class:`TokenSession`: one read/write session, logged in as the user, used
behind one lock (a session runs one operation at a time). A failure that
means the session is gone (token removed, device error, session handle
invalid, logged out) drops it; the next call opens a new one and logs in
again, and a call that may safely run twice (a read, a signature) is retried
once on the new session at once.

The PIN is read at each login from the source the backend names (a file, an
environment variable), handed to ``C_Login`` and not kept. A PIN the token
refused is remembered by its SHA-256 digest only, and not tried again while
the source gives the same PIN: HSMs lock the user PIN after a few failed
logins, and a daemon retrying every pass would lock it. Correcting the file
or the variable is enough (a daemon reads it again at its next attempt).

Messages never carry the PIN: python-pkcs11 puts none in its exceptions, and
the messages here are built from the exception's class (the ``CKR_`` code)
and text of keymgr's own.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from keymgr.errors import BackendError

T = TypeVar("T")

#: Failures after which the session cannot be trusted: it is dropped and the
#: next call opens (and logs in to) a new one.
SESSION_LOST = frozenset(
    {
        "SessionHandleInvalid",
        "SessionClosed",
        "DeviceRemoved",
        "DeviceError",
        "TokenNotPresent",
        "TokenNotRecognised",
        "UserNotLoggedIn",
    }
)

#: What the codes an operator meets most mean, and what to do.
_HINTS: dict[str, str] = {
    "PinIncorrect": "the token refused the PIN",
    "PinLocked": "the user PIN is locked; the token's security officer must unlock or reset it",
    "PinExpired": "the user PIN has expired; set a new one",
    "PinInvalid": "the PIN has characters the token does not accept",
    "PinLenRange": "the PIN is too short or too long for the token",
    "UserPinNotInitialized": "the token has no user PIN yet (initialise the token first)",
    "TokenNotPresent": "no token in the slot",
    "TokenNotRecognised": "the token in the slot is not recognised",
    "DeviceRemoved": "the token was removed",
    "DeviceError": "the token failed",
    "DeviceMemory": "the token is out of memory",
    "TokenWriteProtected": "the token is write-protected",
    "SessionCount": "the token has no session left",
    "MechanismInvalid": "the token does not offer this mechanism",
    "MechanismParamInvalid": "the token refused the mechanism's parameters",
    "KeySizeRange": "the token does not support this key size",
    "DomainParamsInvalid": "the token does not support this curve",
    "TemplateInconsistent": "the token refused the key's attributes",
    "AttributeValueInvalid": "the token refused an attribute value",
    "AttributeSensitive": "the attribute is sensitive: the token will not reveal it",
    "FunctionFailed": "the token could not do it",
    "GeneralError": "the module failed (for SoftHSM: is SOFTHSM2_CONF and its tokendir readable?)",
}
#: Class names whose CKR_ name is not their CamelCase split.
_CKR: dict[str, str] = {
    "SlotIDInvalid": "CKR_SLOT_ID_INVALID",
    "TokenNotRecognised": "CKR_TOKEN_NOT_RECOGNIZED",
    "RandomNoRNG": "CKR_RANDOM_NO_RNG",
    "FunctionCancelled": "CKR_FUNCTION_CANCELED",
    "AnotherUserAlreadyLoggedIn": "CKR_USER_ANOTHER_ALREADY_LOGGED_IN",
}
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")


def ckr_name(e: BaseException) -> str:
    """The ``CKR_`` return code a python-pkcs11 exception stands for."""
    name = type(e).__name__
    return _CKR.get(name) or "CKR_" + _CAMEL.sub("_", name).upper()


def describe(e: BaseException) -> str:
    """One line for a python-pkcs11 exception: what it means and its ``CKR_`` code."""
    name = type(e).__name__
    if name == "PKCS11Error":  # raised by python-pkcs11 itself, with a text of its own
        return _one_line(str(e)) or "PKCS#11 error"
    hint = _HINTS.get(name)
    return f"{hint} ({ckr_name(e)})" if hint else ckr_name(e)


def _one_line(text: str) -> str:
    return " ".join(text.split())


class TokenSession:
    """The process's one session on one token (see the module docstring).

    ``generation`` grows at every new session: object handles found in an
    older one are stale and must be looked up again.
    """

    def __init__(self, module: str, shown: str, label: str | None, slot: int | None) -> None:
        self.module = module
        self.shown = shown
        self.label = label
        self.slot = slot
        self.lock = threading.RLock()
        self.generation = 0
        self._token: Any = None
        self._session: Any = None
        self._mechanisms: frozenset[int] | None = None
        self._refused_pin: bytes | None = None

    @property
    def what(self) -> str:
        """How messages name the token."""
        return f"token {self.label!r}" if self.label is not None else f"slot {self.slot}"

    # -- module and token -----------------------------------------------------

    def token(self, where: str, op: str) -> Any:
        """The ``pkcs11.Token``, found through the module on first use (caller holds the lock)."""
        if self._token is not None:
            return self._token
        import pkcs11

        if not os.path.isfile(self.module):
            raise BackendError(
                f"{where}: {op}: PKCS#11 module {self.shown} does not exist or is not a file"
            )
        try:
            lib = pkcs11.lib(self.module)
        except pkcs11.PKCS11Error as e:
            reason = describe(e)
            for lead in ("OS exception while loading ", "Unknown exception while loading "):
                if reason.startswith(lead):  # "...loading PATH: dlerror", dlerror names PATH
                    reason = reason[len(lead) :].partition(": ")[2] or reason
            raise BackendError(
                f"{where}: {op}: cannot load PKCS#11 module {self.shown}: {reason}"
            ) from None
        try:
            if self.label is not None:
                found = list(lib.get_tokens(token_label=self.label))
                if not found:
                    labels = sorted(repr(t.label) for t in lib.get_tokens() if t.label)
                    raise BackendError(
                        f"{where}: {op}: no token labelled {self.label!r} in {self.shown} "
                        f"(tokens: {', '.join(labels) or 'none'})"
                    )
                if len(found) > 1:
                    raise BackendError(
                        f"{where}: {op}: {len(found)} tokens are labelled {self.label!r} in "
                        f"{self.shown}; name one by its slot"
                    )
                token = found[0]
            else:
                slots = {s.slot_id: s for s in lib.get_slots()}
                if self.slot not in slots:
                    raise BackendError(
                        f"{where}: {op}: no slot {self.slot} in {self.shown} "
                        f"(slots: {', '.join(map(str, sorted(slots))) or 'none'})"
                    )
                token = slots[self.slot].get_token()
        except pkcs11.PKCS11Error as e:
            reason = describe(e)
            raise BackendError(f"{where}: {op}: {self.what} in {self.shown}: {reason}") from None
        self._token = token
        return token

    def mechanisms(self, where: str, op: str) -> frozenset[int]:
        """The mechanisms the token's slot offers (``CKM_`` numbers); no login needed."""
        import pkcs11

        with self.lock:
            if self._mechanisms is None:
                token = self.token(where, op)
                try:
                    self._mechanisms = frozenset(int(m) for m in token.slot.get_mechanisms())
                except pkcs11.PKCS11Error as e:
                    raise BackendError(f"{where}: {op}: {self.what}: {describe(e)}") from None
            return self._mechanisms

    def key_sizes(self, where: str, op: str, mechanism: int) -> tuple[int | None, int | None]:
        """(min, max) key size in bits the token allows for ``mechanism``."""
        import pkcs11

        with self.lock:
            token = self.token(where, op)
            try:
                info = token.slot.get_mechanism_info(mechanism)
            except pkcs11.PKCS11Error as e:
                raise BackendError(f"{where}: {op}: {self.what}: {describe(e)}") from None
            return info.min_key_length, info.max_key_length

    # -- the session ------------------------------------------------------------

    def _open(self, where: str, op: str, pin: Callable[[], str], pin_source: str) -> Any:
        import pkcs11

        token = self.token(where, op)
        secret = pin()
        digest = hashlib.sha256(secret.encode("utf-8")).digest()
        if digest == self._refused_pin:
            raise BackendError(
                f"{where}: {op}: login to {self.what}: the token refused this PIN before "
                f"(CKR_PIN_INCORRECT); not trying it again, since tokens lock the PIN after a "
                f"few failed logins: correct {pin_source}"
            )
        try:
            try:
                session = token.open(rw=True, user_pin=secret)
            except pkcs11.UserAlreadyLoggedIn:
                # Logged in by another session of this process (not keymgr's).
                session = token.open(rw=True)
        except pkcs11.PinIncorrect:
            self._refused_pin = digest
            raise BackendError(
                f"{where}: {op}: login to {self.what}: the token refused the PIN from "
                f"{pin_source} (CKR_PIN_INCORRECT)"
            ) from None
        except pkcs11.PKCS11Error as e:
            if type(e).__name__ in SESSION_LOST:
                self._token = None
            raise BackendError(f"{where}: {op}: login to {self.what}: {describe(e)}") from None
        finally:
            del secret
        self._refused_pin = None
        self._session = session
        self.generation += 1
        return session

    def drop(self) -> None:
        """Forget the session (closed if it still answers); the next call opens a new one."""
        with self.lock:
            session, self._session = self._session, None
            self._token = None
            if session is not None:
                with contextlib.suppress(Exception):
                    session.close()

    def run(
        self,
        where: str,
        op: str,
        fn: Callable[[Any], T],
        pin: Callable[[], str],
        pin_source: str,
        *,
        retry: bool = True,
    ) -> T:
        """``fn(session)`` under the lock, on the open session (opened and logged in if
        needed). A PKCS#11 failure becomes ``BackendError("WHERE: OP: reason")``;
        one that lost the session drops it and, with ``retry``, runs ``fn`` again
        once on a new session."""
        import pkcs11

        with self.lock:
            for attempt in (1, 2):
                session = self._session or self._open(where, op, pin, pin_source)
                try:
                    return fn(session)
                except pkcs11.PKCS11Error as e:
                    lost = type(e).__name__ in SESSION_LOST
                    if lost:
                        self.drop()
                    if lost and retry and attempt == 1:
                        continue
                    raise BackendError(f"{where}: {op}: {describe(e)}") from None
        raise AssertionError("unreachable")  # pragma: no cover


_SESSIONS: dict[tuple[str, str | None, int | None], TokenSession] = {}
_SESSIONS_LOCK = threading.Lock()


def token_session(module: Path, label: str | None, slot: int | None) -> TokenSession:
    """The process's :class:`TokenSession` for a token, made on first use."""
    key = (os.path.realpath(module), label, slot)
    with _SESSIONS_LOCK:
        found = _SESSIONS.get(key)
        if found is None:
            found = _SESSIONS[key] = TokenSession(key[0], str(module), label, slot)
        return found
