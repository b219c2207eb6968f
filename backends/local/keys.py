"""Local encrypted file backend: one AES-256-GCM encrypted file per private key.

For single-host deployments that have no KMS or Vault. Private keys are stored
as ``PATH/RING/KID.key``, encrypted under a 32-byte master key that lives
outside the key directory (a separate file, or ``KEYMGR_MASTER_KEY``), so a
copy of the key directory alone (a backup, a misconfigured volume) reveals
nothing. The associated data binds each ciphertext to its ring, kid and
algorithm, so a file renamed or moved to another ring fails authentication
instead of being used as a different key.

Decrypted keys live only in this process's memory (a dict). Python cannot
scrub memory, so "destroy" means: dropped from the cache and the encrypted file
unlinked (plus any temp file a crash left behind for that kid).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import re
import stat
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keymgr import jose
from keymgr.backend import Backend, GeneratedKey, Signer
from keymgr.errors import BackendError, ConfigError, KeyIntegrityError, KeyNotFoundError
from keymgr.fsutil import (
    TMP_SUFFIX,
    NotAFile,
    atomic_write,
    dir_problem,
    fsync_dir,
    is_temp_of,
    read_file,
)
from keymgr.options import Options

MASTER_KEY_ENV = "KEYMGR_MASTER_KEY"
MASTER_KEY_SIZE = 32
FORMAT_VERSION = 1
NONCE_SIZE = 12
KEY_SUFFIX = ".key"
#: The largest key file read (an RSA-4096 key file is about 5 KB): a larger
#: "key file" is something else, refused unread.
MAX_KEY_FILE = 1 << 20
# Temp files (".KID.key.RANDOM.tmp", see keymgr.fsutil) start with "." so no
# listing or glob for "*.key" ever sees them, and carry the kid so destroy() can
# remove a crash leftover of that key too.
_TMP_PREFIX = "."
_TMP_SUFFIX = TMP_SUFFIX
_AAD_PREFIX = b"keymgr-file-v1\0"
_NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
_B64_TEXT_RE = re.compile(rb"[A-Za-z0-9+/_=-]+")
_OPTIONS = frozenset({"type", "path", "master_key_file", "rsa_bits"})
# Upper bound only to turn a typo (rsa_bits = 40960) into a config error rather
# than a generate() call that runs for minutes.
_MAX_RSA_BITS = 16384


def _aad(ring: str, kid: str, alg: str) -> bytes:
    return _AAD_PREFIX + b"\0".join(s.encode("utf-8") for s in (ring, kid, alg))


class FileBackend(Backend):
    """Keys as encrypted files on local disk (``type = "file"``)."""

    type_name: ClassVar[str] = "file"
    algorithms: ClassVar[frozenset[str]] = jose.ALGORITHMS

    def __init__(self, name: str, options: Mapping[str, Any], config_dir: str) -> None:
        super().__init__(name, options, config_dir)
        # Paths are relative to the config file, not the working directory, so
        # the same config means the same files under systemd or from a shell.
        o = Options(options, f"backends.{name}", _OPTIONS, config_dir=config_dir)
        self._path: Path = Path(config_dir) / o.required("path", "the key directory")
        self._master_key_file = o.path("master_key_file")
        if self._master_key_file is not None and _inside(self._master_key_file, self._path):
            raise o.err(
                "master_key_file",
                f"must not be inside the key directory {self._path} "
                f"(a copy of that directory alone must reveal nothing)",
            )
        rsa_bits = o.integer("rsa_bits", 3072, jose.MIN_RSA_BITS, _MAX_RSA_BITS)
        self._rsa_bits = rsa_bits
        self._lock = threading.RLock()
        self._aead: AESGCM | None = None
        # (ring, kid) -> (alg, private key); decrypted keys never leave memory.
        self._keys: dict[tuple[str, str], tuple[str, jose.PrivateKey]] = {}
        self._signers: dict[tuple[str, str, str], Signer] = {}

    def paths(self) -> dict[str, Path]:
        out = {"path": self._path}
        if self._master_key_file is not None:
            out["master_key_file"] = self._master_key_file
        return out

    def _cipher(self) -> AESGCM:
        """The AEAD under the master key, loaded on first use (config check stays offline)."""
        with self._lock:
            if self._aead is None:
                self._aead = AESGCM(self._load_master_key())
            return self._aead

    def _load_master_key(self) -> bytes:
        # Messages name the source but never echo any of its content.
        if self._master_key_file is not None:
            where = f"backends.{self.name}: master key file {self._master_key_file}"
            try:
                fd = os.open(self._master_key_file, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
            except OSError as e:
                raise BackendError(f"{where}: cannot read ({e.strerror or e})") from None
            with os.fdopen(fd, "rb") as f:
                # The mode of the file actually opened, checked before reading it.
                problem = master_key_exposure(os.fstat(f.fileno()), self._master_key_file)
                if problem is not None:
                    raise BackendError(f"{where}: {problem}")
                try:
                    raw = f.read()
                except OSError as e:
                    raise BackendError(f"{where}: cannot read ({e.strerror or e})") from None
            text = raw.strip()
            if text and _B64_TEXT_RE.fullmatch(text):
                key = _decode_b64_key(text)
                if key is None:
                    raise BackendError(
                        f"{where}: must hold base64 of {MASTER_KEY_SIZE} bytes "
                        f"(or exactly {MASTER_KEY_SIZE} raw bytes)"
                    )
                return key
            if len(raw) == MASTER_KEY_SIZE:
                return raw
            raise BackendError(
                f"{where}: must hold base64 of {MASTER_KEY_SIZE} bytes "
                f"(or exactly {MASTER_KEY_SIZE} raw bytes), found {len(raw)} bytes"
            )
        value = os.environ.get(MASTER_KEY_ENV)
        if value is None or not value.strip():
            raise BackendError(
                f"backends.{self.name}: no master key: set {MASTER_KEY_ENV} "
                f"or backends.{self.name}.master_key_file"
            )
        key = _decode_b64_key(value.strip().encode("ascii", "replace"))
        if key is None:
            raise BackendError(
                f"backends.{self.name}: {MASTER_KEY_ENV} must hold base64 of "
                f"{MASTER_KEY_SIZE} bytes"
            )
        return key

    def offline_check(self) -> list[str]:
        """For ``keymgr config check``: stats only, no read of key material, no write.

        What ``nginx -t`` or ``sshd -t`` would catch before a deploy: a master
        key file that does not exist, cannot be read by this user, is not a
        regular file, or that group or others may read or write; a key
        directory that does not exist and cannot be created. Each is a
        ConfigError naming the field and the file.
        """
        self._check_dir(f"backends.{self.name}.path", self._path)
        path = self._master_key_file
        if path is None:
            if not os.environ.get(MASTER_KEY_ENV, "").strip():
                raise ConfigError(
                    f"backends.{self.name}.master_key_file: not set and {MASTER_KEY_ENV} is "
                    "empty: no key can be generated or used"
                )
            return []
        field = f"backends.{self.name}.master_key_file"
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise ConfigError(
                f"{field}: {path} does not exist: no key can be generated or used without "
                "it ('keymgr init' writes one, mode 0600)"
            ) from None
        except OSError as e:
            raise ConfigError(f"{field}: cannot check {path} ({e.strerror or e})") from None
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{field}: {path} is not a regular file")
        problem = master_key_exposure(st, path)
        if problem is not None:
            raise ConfigError(f"{field}: {path}: {problem}")
        if not os.access(path, os.R_OK):
            raise ConfigError(f"{field}: {path} is not readable by this user (uid {os.getuid()})")
        return []

    @staticmethod
    def _check_dir(field: str, path: Path) -> None:
        problem = dir_problem(path)
        if problem is not None:
            raise ConfigError(f"{field}: {path}: {problem}")

    # -- paths ------------------------------------------------------------

    def _check_name(self, what: str, value: str) -> None:
        if not isinstance(value, str) or value in (".", "..") or not _NAME_RE.fullmatch(value):
            raise BackendError(
                f"backends.{self.name}: invalid {what} {value!r} "
                "(allowed: letters, digits, '_', '.', '-'; not '.' or '..')"
            )

    def _ring_dir(self, ring: str) -> Path:
        self._check_name("ring name", ring)
        return self._path / ring

    def _key_path(self, ring: str, kid: str) -> Path:
        self._check_name("key id", kid)
        return self._ring_dir(ring) / f"{kid}{KEY_SUFFIX}"

    def _ensure_dir(self, path: Path) -> None:
        """Create ``path`` (and the base dir) as 0700, durably."""
        for d in (self._path, path):
            if d.is_dir():
                continue
            try:
                d.mkdir(mode=0o700, parents=True, exist_ok=True)
                os.chmod(d, 0o700)  # exactly 0700, whatever the umask masked off
                fsync_dir(d.parent)
            except OSError as e:
                raise BackendError(
                    f"backends.{self.name}: cannot create directory {d} ({e.strerror or e})"
                ) from None
        # The ring directory is keymgr's own: tighten it even if someone
        # created it with a wider mode. The base directory is left as found.
        try:
            if path.stat().st_mode & 0o077:
                os.chmod(path, 0o700)
        except OSError as e:
            raise BackendError(
                f"backends.{self.name}: cannot secure directory {path} ({e.strerror or e})"
            ) from None

    # -- file format --------------------------------------------------------

    def _write_new(
        self, ring: str, kid: str, alg: str, key: jose.PrivateKey, intent: str | None = None
    ) -> None:
        ring_dir = self._ring_dir(ring)
        target = self._key_path(ring, kid)
        der = key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        nonce = os.urandom(NONCE_SIZE)
        ciphertext = self._cipher().encrypt(nonce, der, _aad(ring, kid, alg))
        document = {
            "v": FORMAT_VERSION,
            "ring": ring,
            "kid": kid,
            "alg": alg,
            "nonce": jose.b64url(nonce),
            "ciphertext": jose.b64url(ciphertext),
        }
        if intent is not None:
            # In clear: finding a crash orphan must not need the master key.
            document["intent"] = intent
        body = (json.dumps(document, separators=(",", ":")) + "\n").encode("ascii")
        self._ensure_dir(ring_dir)
        if os.path.lexists(target):
            # A kid is a hash of a fresh random key, so this means a bug or a
            # tampered directory; never clobber what may be a live key.
            raise BackendError(
                f"backends.{self.name}: key file {target} already exists; refusing to overwrite"
            )
        try:
            # Temp file ".KID.key.RANDOM.tmp" (destroy() also sweeps crash leftovers);
            # exclusive: a link, never a replace, so a live key is never clobbered.
            atomic_write(target, body, 0o600, exclusive=True)
        except OSError as e:
            raise BackendError(
                f"backends.{self.name}: cannot write key file {target} ({e.strerror or e})"
            ) from None

    def _load(self, ring: str, kid: str) -> tuple[str, jose.PrivateKey]:
        """Decrypt and verify a key file; cached, so each file is decrypted once."""
        with self._lock:
            cached = self._keys.get((ring, kid))
            if cached is not None:
                return cached
            path = self._key_path(ring, kid)
            try:
                raw = read_file(path, MAX_KEY_FILE)
            except FileNotFoundError:
                raise KeyNotFoundError(
                    f"backends.{self.name}: key {ring}/{kid} not found ({path})"
                ) from None
            except NotAFile as e:
                raise BackendError(f"backends.{self.name}: key file {path}: {e}") from None
            except OSError as e:
                raise BackendError(
                    f"backends.{self.name}: cannot read key file {path} ({e.strerror or e})"
                ) from None
            alg, key = self._decrypt(path, ring, kid, raw)
            self._keys[(ring, kid)] = (alg, key)
            return alg, key

    def _decrypt(self, path: Path, ring: str, kid: str, raw: bytes) -> tuple[str, jose.PrivateKey]:
        def bad(what: str) -> KeyIntegrityError:
            return KeyIntegrityError(f"key file {path}: {what}")

        try:
            doc = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise bad("malformed (not JSON)") from None
        if not isinstance(doc, dict):
            raise bad("malformed (not a JSON object)")
        if doc.get("v") != FORMAT_VERSION:
            raise bad(f"unsupported format version {doc.get('v')!r}")
        fields: dict[str, str] = {}
        for field in ("ring", "kid", "alg", "nonce", "ciphertext"):
            value = doc.get(field)
            if not isinstance(value, str):
                raise bad(f"malformed (missing or non-string {field!r})")
            fields[field] = value
        if fields["ring"] != ring or fields["kid"] != kid:
            raise bad(
                f"names ring/kid {fields['ring']!r}/{fields['kid']!r}, "
                f"but its path says {ring!r}/{kid!r}"
            )
        alg = fields["alg"]
        if alg not in jose.ALGORITHMS:
            raise bad(f"unsupported algorithm {alg!r}")
        try:
            nonce = jose.b64url_decode(fields["nonce"])
            ciphertext = jose.b64url_decode(fields["ciphertext"])
        except ValueError:
            raise bad("malformed (bad base64url in nonce or ciphertext)") from None
        if len(nonce) != NONCE_SIZE:
            raise bad(f"malformed (nonce is {len(nonce)} bytes, expected {NONCE_SIZE})")
        cipher = self._cipher()
        try:
            der = cipher.decrypt(nonce, ciphertext, _aad(ring, kid, alg))
        except InvalidTag:
            raise bad("authentication failed (wrong master key or tampered file)") from None
        try:
            key = serialization.load_der_private_key(der, password=None)
        except (ValueError, TypeError):
            raise bad("decrypted content is not a PKCS#8 private key") from None
        if not isinstance(key, jose.PrivateKey):
            raise bad(f"holds an unsupported key type {type(key).__name__}")
        try:
            jose.check_key_matches_alg(key, alg)
        except ValueError as e:
            raise bad(str(e)) from None
        if jose.thumbprint(jose.public_jwk(key.public_key())) != kid:
            raise bad("public key thumbprint does not match the kid")
        return alg, key

    # -- Backend API --------------------------------------------------------

    def generate(self, ring: str, alg: str, *, intent: str | None = None) -> GeneratedKey:
        self._check_name("ring name", ring)
        if alg not in self.algorithms:
            raise BackendError(
                f"backends.{self.name}: unsupported algorithm {alg!r} "
                f"(supported: {', '.join(sorted(self.algorithms))})"
            )
        # Prove the master key on a key the ring already has (decrypted once,
        # then cached): with a wrong master key, a new key would be one that
        # the right master key can never open, and the old ones unusable.
        existing = self.list_keys(ring)
        if existing:
            self._load(ring, existing[0])
        key = jose.generate_private_key(alg, self._rsa_bits)
        jwk = jose.public_jwk(key.public_key())
        kid = jose.thumbprint(jwk)
        with self._lock:
            self._write_new(ring, kid, alg, key, intent)
            self._keys[(ring, kid)] = (alg, key)
        return GeneratedKey(kid=kid, public_jwk=jwk)

    def intent_of(self, ring: str, kid: str) -> str | None:
        """The ``intent`` member of the key file (None for files without one)."""
        self._check_name("ring name", ring)
        self._check_name("kid", kid)
        try:
            doc = json.loads(read_file(self._key_path(ring, kid), MAX_KEY_FILE))
        except (OSError, ValueError):
            return None
        intent = doc.get("intent") if isinstance(doc, dict) else None
        return intent if isinstance(intent, str) else None

    def public_jwk(self, ring: str, kid: str) -> dict[str, str]:
        _, key = self._load(ring, kid)
        return jose.public_jwk(key.public_key())

    def signer(self, ring: str, kid: str, alg: str) -> Signer:
        with self._lock:
            cached = self._signers.get((ring, kid, alg))
            if cached is not None:
                return cached
            stored_alg, key = self._load(ring, kid)
            # Any alg the key fits is allowed, not only the one it was generated
            # for: the reconciler adopts orphans by key type, and refusing here
            # would leave an adopted key unable to sign once promoted.
            try:
                sign = jose.make_signer(key, alg)
            except ValueError as e:
                raise BackendError(
                    f"backends.{self.name}: key {ring}/{kid} (generated for {stored_alg}) "
                    f"cannot sign {alg}: {e}"
                ) from None
            self._signers[(ring, kid, alg)] = sign
            return sign

    def destroy(self, ring: str, kid: str) -> None:
        path = self._key_path(ring, kid)
        ring_dir = path.parent
        with self._lock:
            self._keys.pop((ring, kid), None)
            for cache_key in [k for k in self._signers if k[:2] == (ring, kid)]:
                del self._signers[cache_key]
            if not ring_dir.is_dir():
                return
            try:
                names = os.listdir(ring_dir)
            except OSError as e:
                raise BackendError(
                    f"backends.{self.name}: cannot list {ring_dir} ({e.strerror or e})"
                ) from None
            leftovers = [ring_dir / n for n in names if is_temp_of(n, path.name)]
            try:
                for victim in [path, *leftovers]:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(victim)
                fsync_dir(ring_dir)
            except OSError as e:
                raise BackendError(
                    f"backends.{self.name}: cannot remove key file {path} ({e.strerror or e})"
                ) from None

    def list_keys(self, ring: str) -> list[str]:
        ring_dir = self._ring_dir(ring)
        try:
            names = os.listdir(ring_dir)
        except FileNotFoundError:
            return []
        except OSError as e:
            raise BackendError(
                f"backends.{self.name}: cannot list {ring_dir} ({e.strerror or e})"
            ) from None
        kids = []
        for name in names:
            if name.startswith(_TMP_PREFIX) or not name.endswith(KEY_SUFFIX):
                continue
            kid = name[: -len(KEY_SUFFIX)]
            if _NAME_RE.fullmatch(kid):
                kids.append(kid)
        return sorted(kids)

    def check(self) -> None:
        """Directory usable and master key loadable; also proves the master key on one file.

        Trial-decrypting one existing key file turns "wrong master key after a
        redeploy" into a readiness failure instead of a failure at the next
        signing or rotation.
        """
        self._cipher()
        try:
            self._path.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".check-", suffix=_TMP_SUFFIX, dir=self._path)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise BackendError(
                f"backends.{self.name}: key directory {self._path} is not writable "
                f"({e.strerror or e})"
            ) from None
        # Any one key proves the master key: the first ring directory that
        # holds one, in directory order. Not sorted: the daemon checks on every
        # heartbeat, and sorting 100,000 ring directories as Path objects took
        # 2.2 s and left 23 MB resident (benchmarks/bench_scale.py).
        try:
            with os.scandir(self._path) as entries:
                for entry in entries:
                    if not _NAME_RE.fullmatch(entry.name) or not entry.is_dir():
                        continue
                    kids = self.list_keys(entry.name)
                    if kids:
                        self._load(entry.name, kids[0])
                        return
        except OSError as e:
            raise BackendError(
                f"backends.{self.name}: key directory {self._path}: {e.strerror or e}"
            ) from None


def master_key_exposure(st: os.stat_result, path: Path) -> str | None:
    """Why a master key file with this stat is not safe to use, or None if it is.

    Group and others may neither read nor write it (``chmod 600``). One layout
    is accepted on purpose: a file owned by root and readable by its group only
    (``root:keymgr 0640``, as deploy/systemd installs it), so that the service
    reads its key through its group but cannot change it.
    """
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    mode = stat.S_IMODE(st.st_mode)
    exposed = mode & 0o077
    if not exposed or (st.st_uid == 0 and exposed == 0o040):
        return None
    who = " and ".join(
        w for w, bits in (("group", 0o070), ("others", 0o007)) if exposed & bits
    )
    fix = f"chmod 600 {path}"
    if st.st_uid == 0:
        fix += " (or 640, if keymgr reads it as its group)"
    acts = [a for a, bits in (("read", 0o044), ("write", 0o022)) if exposed & bits]
    return f"mode {mode:04o} lets {who} {' and '.join(acts) or 'access'} it; fix: {fix}"


def _decode_b64_key(text: bytes) -> bytes | None:
    """Decode standard or URL-safe base64 (padding optional); None unless 32 bytes."""
    normalized = text.replace(b"-", b"+").replace(b"_", b"/").rstrip(b"=")
    normalized += b"=" * (-len(normalized) % 4)
    try:
        key = base64.b64decode(normalized, validate=True)
    except (binascii.Error, ValueError):
        return None
    return key if len(key) == MASTER_KEY_SIZE else None


def _inside(path: Path, directory: Path) -> bool:
    return path.resolve().is_relative_to(directory.resolve())
