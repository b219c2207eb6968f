"""A real SoftHSM2 token for the PKCS#11 tests, and tools to look at it from outside keymgr.

- ``softhsm`` (session fixture): per pytest worker, a temp directory with its
  own ``softhsm2.conf`` and token directory, ``SOFTHSM2_CONF`` set in this
  process's environment for the whole session (the module reads it once, at
  ``C_Initialize``: it must be set before the first backend of the process
  loads the module, and never change after), and tokens initialised with
  ``softhsm2-util --init-token --free``: ``keymgr-test`` (the tests' token)
  and ``keymgr-spare`` (for wrong-PIN logins: whatever a token does after
  failed logins never touches the main one). Every token's user PIN is
  distinctive (``SoftHSM.pin``), so a test can grep any output for it.
  Skips when SoftHSM2 (``apt-get install softhsm2``) or python-pkcs11 is
  missing.
- ``SoftHSM.env()``: the environment a ``keymgr`` subprocess needs: the
  token's ``SOFTHSM2_CONF``, and a directory on ``PYTHONPATH`` whose
  ``.dist-info`` registers the ``pkcs11`` backend type under the
  ``keymgr.backends`` entry-point group, as a third-party plug-in would (a
  no-op once keymgr's own table lists it).
- ``SoftHSM.tool(command, ...)``: this module run as a script in a fresh
  interpreter (``python -m tests.servers_softhsm COMMAND JSON``), talking to
  the token with python-pkcs11 directly: an independent look at what is on
  the token (``objects``), attempts to read or export private keys
  (``extract``), and keys made behind keymgr's back (``make``). A separate
  process, so that its login and logout never touch the session of the
  backend under test (PKCS#11 logs in per process).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
TOKEN = "keymgr-test"
SPARE = "keymgr-spare"
#: Where the backend lives, by entry point (as pyproject.toml registers it).
ENTRY_POINT = "keymgr.backends.pkcs11.keys:PKCS11Backend"
MODULE_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)


def softhsm_module() -> str | None:
    for path in (os.environ.get("SOFTHSM2_MODULE"), *MODULE_CANDIDATES):
        if path and os.path.isfile(path):
            return path
    return None


@dataclass
class SoftHSM:
    """A SoftHSM2 token directory with initialised tokens."""

    dir: Path
    conf: Path
    module: str
    pin: str
    so_pin: str
    plugin_path: Path
    label: str = TOKEN

    def env(self, base: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        env["SOFTHSM2_CONF"] = str(self.conf)
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(self.plugin_path), str(REPO), env.get("PYTHONPATH")])
        )
        env.update(extra)
        return env

    def pin_file(self, path: Path, pin: str | None = None, mode: int = 0o600) -> Path:
        path.write_text((self.pin if pin is None else pin) + "\n")
        path.chmod(mode)
        return path

    def options(self, pin_file: Path, **extra: Any) -> dict[str, Any]:
        """A ``[backends.NAME]`` table for the test token."""
        return {
            "type": "pkcs11",
            "module": self.module,
            "token_label": self.label,
            "pin_file": str(pin_file),
            "rsa_bits": 2048,
            **extra,
        }

    def tool(self, command: str, timeout: float = 60, **args: Any) -> Any:
        """Run ``command`` of this module in a fresh interpreter; its JSON answer."""
        proc = subprocess.run(
            [sys.executable, "-m", "tests.servers_softhsm", command, json.dumps(args)],
            capture_output=True,
            text=True,
            cwd=REPO,
            env=self.env(),
            timeout=timeout,
        )
        if proc.returncode != 0:
            raise AssertionError(f"servers_softhsm {command} failed:\n{proc.stderr[-3000:]}")
        return json.loads(proc.stdout)

    def objects(self, label_prefix: str = "", token: str | None = None) -> list[dict[str, Any]]:
        """Every token object whose label starts with ``label_prefix``."""
        result: list[dict[str, Any]] = self.tool(
            "objects", token=token or self.label, pin=self.pin, prefix=label_prefix
        )
        return result


def init_token(conf: Path, label: str, pin: str, so_pin: str) -> None:
    proc = subprocess.run(
        ["softhsm2-util", "--init-token", "--free", "--label", label, "--pin", pin,
         "--so-pin", so_pin],
        capture_output=True, text=True, env={**os.environ, "SOFTHSM2_CONF": str(conf)},
        timeout=60,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"softhsm2-util --init-token failed: {proc.stdout}{proc.stderr}")


def write_plugin_dist(path: Path) -> None:
    """A ``.dist-info`` that registers the ``pkcs11`` backend type, as a plug-in would."""
    info = path / "keymgr_pkcs11_under_test-0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: keymgr-pkcs11-under-test\nVersion: 0\n"
    )
    (info / "entry_points.txt").write_text(f"[keymgr.backends]\npkcs11 = {ENTRY_POINT}\n")


def make_softhsm(base: Path) -> SoftHSM:
    """A token directory in ``base`` with both tokens initialised (``SOFTHSM2_CONF``
    is not touched: see :func:`softhsm_session`). Skips when SoftHSM2 is missing."""
    module = softhsm_module()
    if module is None or shutil.which("softhsm2-util") is None:
        pytest.skip("SoftHSM2 not installed (apt-get install softhsm2)")
    pytest.importorskip("pkcs11", reason="python-pkcs11 not installed")
    tokens = base / "tokens"
    tokens.mkdir(parents=True)
    conf = base / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tokens}\nobjectstore.backend = file\n"
        "log.level = ERROR\nslots.removable = false\n"
    )
    # Distinctive: any output that contains them leaked them.
    pin = "pin-" + secrets.token_hex(8)
    so_pin = "so-" + secrets.token_hex(8)
    for label in (TOKEN, SPARE):
        init_token(conf, label, pin, so_pin)
    plugin_path = base / "plugin"
    write_plugin_dist(plugin_path)
    return SoftHSM(base, conf, module, pin, so_pin, plugin_path)


def softhsm_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHSM]:
    """The body of the ``softhsm`` fixture: a token directory, and ``SOFTHSM2_CONF``
    pointing at it in this process until the session ends."""
    hsm = make_softhsm(tmp_path_factory.mktemp("softhsm"))
    old = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(hsm.conf)
    try:
        yield hsm
    finally:
        if old is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = old


@pytest.fixture(scope="session")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHSM]:
    yield from softhsm_session(tmp_path_factory)


# --------------------------------------------------------------------------- the tool


def _open(args: dict[str, Any]) -> Any:
    import pkcs11

    lib = pkcs11.lib(softhsm_module() or MODULE_CANDIDATES[0])
    return lib.get_token(token_label=args["token"]).open(rw=True, user_pin=args["pin"])


def _public_pem(obj: Any) -> str | None:
    """The public key of a public key object as PEM (cryptography, not keymgr)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
    from pkcs11 import Attribute, KeyType

    curves = {
        "06082a8648ce3d030107": ec.SECP256R1(),
        "06052b81040022": ec.SECP384R1(),
        "06052b81040023": ec.SECP521R1(),
    }
    kt = obj[Attribute.KEY_TYPE]
    key: Any
    if kt == KeyType.RSA:
        n = int.from_bytes(obj[Attribute.MODULUS], "big")
        e = int.from_bytes(obj[Attribute.PUBLIC_EXPONENT], "big")
        key = rsa.RSAPublicNumbers(e, n).public_key()
    else:
        point = bytes(obj[Attribute.EC_POINT])
        point = point[2:] if point[1] < 0x80 else point[3:]  # DER OCTET STRING
        if kt == KeyType.EC_EDWARDS:
            key = ed25519.Ed25519PublicKey.from_public_bytes(point)
        else:
            key = ec.EllipticCurvePublicKey.from_encoded_point(
                curves[bytes(obj[Attribute.EC_PARAMS]).hex()], point
            )
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def cmd_objects(args: dict[str, Any]) -> list[dict[str, Any]]:
    from pkcs11 import Attribute, ObjectClass

    out = []
    with _open(args) as session:
        found = list(session.get_objects({Attribute.TOKEN: True}))
        for obj in found:
            label = str(obj[Attribute.LABEL])
            if not label.startswith(args["prefix"]):
                continue
            cls = obj[Attribute.CLASS]
            rec: dict[str, Any] = {
                "class": "private" if cls == ObjectClass.PRIVATE_KEY else "public"
                if cls == ObjectClass.PUBLIC_KEY else str(cls),
                "label": label,
                "id": bytes(obj[Attribute.ID]).hex(),
                "key_type": obj[Attribute.KEY_TYPE].name,
            }
            if cls == ObjectClass.PUBLIC_KEY:
                rec["pem"] = _public_pem(obj)
            if cls == ObjectClass.PRIVATE_KEY:
                for a in ("SENSITIVE", "EXTRACTABLE", "ALWAYS_SENSITIVE", "NEVER_EXTRACTABLE",
                          "PRIVATE", "SIGN", "DECRYPT", "UNWRAP", "DERIVE"):
                    rec[a.lower()] = bool(obj[Attribute[a]])
            out.append(rec)
    return out


#: Private key attributes that would reveal the key (PKCS#11 2.40, 4.9 and 2.3).
SECRET_ATTRIBUTES = {
    "RSA": ("PRIVATE_EXPONENT", "PRIME_1", "PRIME_2", "EXPONENT_1", "EXPONENT_2",
            "COEFFICIENT"),
    "EC": ("VALUE",),
    "EC_EDWARDS": ("VALUE",),
}  # fmt: skip


def cmd_extract(args: dict[str, Any]) -> list[dict[str, Any]]:
    """Try every way python-pkcs11 has to get a private key's material out."""
    import pkcs11
    from pkcs11 import Attribute, KeyType, ObjectClass

    out = []
    with _open(args) as session:
        wrapping = session.generate_key(
            KeyType.AES, 256, store=False, template={Attribute.WRAP: True}
        )
        privs = list(session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY}))
        for obj in privs:
            label = str(obj[Attribute.LABEL])
            if not label.startswith(args["prefix"]):
                continue
            kt = obj[Attribute.KEY_TYPE].name
            rec: dict[str, Any] = {"label": label, "key_type": kt, "refused": {}}
            for name in SECRET_ATTRIBUTES[kt]:
                try:
                    obj[Attribute[name]]
                    rec["refused"][name] = None  # revealed!
                except pkcs11.PKCS11Error as e:
                    rec["refused"][name] = type(e).__name__
            for name, value in (("EXTRACTABLE", True), ("SENSITIVE", False)):
                try:
                    obj[Attribute[name]] = value
                    rec["refused"][f"set {name}"] = None
                except pkcs11.PKCS11Error as e:
                    rec["refused"][f"set {name}"] = type(e).__name__
            try:
                wrapping.wrap_key(obj, mechanism=pkcs11.Mechanism.AES_KEY_WRAP_PAD)
                rec["refused"]["wrap"] = None
            except pkcs11.PKCS11Error as e:
                rec["refused"]["wrap"] = type(e).__name__
            out.append(rec)
    return out


def cmd_make(args: dict[str, Any]) -> dict[str, Any]:
    """Key pairs made behind keymgr's back, one per entry of ``keys``: ``curve``
    P-256/P-384, ``label``, ``id`` (hex), ``extractable``, ``imported`` (the
    private key created from outside material, not generated on the token)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass

    curves = {"P-256": "06082a8648ce3d030107", "P-384": "06052b81040022"}
    with _open(args) as session:
        for spec in args["keys"]:
            params = bytes.fromhex(curves[spec["curve"]])
            key_id = bytes.fromhex(spec["id"])
            if spec.get("imported"):
                curve = ec.SECP256R1() if spec["curve"] == "P-256" else ec.SECP384R1()
                local = ec.generate_private_key(curve)
                size = (curve.key_size + 7) // 8
                point = local.public_key().public_bytes(
                    serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
                )
                common = {Attribute.TOKEN: True, Attribute.LABEL: spec["label"],
                          Attribute.ID: key_id, Attribute.KEY_TYPE: KeyType.EC,
                          Attribute.EC_PARAMS: params}  # fmt: skip
                session.create_object({
                    **common, Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.SIGN: True,
                    Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                    Attribute.PRIVATE: True,
                    Attribute.VALUE: local.private_numbers().private_value.to_bytes(size, "big"),
                })  # fmt: skip
                session.create_object({
                    **common, Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.VERIFY: True,
                    Attribute.EC_POINT: bytes([4, len(point)]) + point,
                })  # fmt: skip
            else:
                session.generate_keypair(
                    KeyType.EC,
                    id=key_id,
                    label=spec["label"],
                    store=True,
                    capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY,
                    mechanism=Mechanism.EC_KEY_PAIR_GEN,
                    public_template={Attribute.EC_PARAMS: params},
                    private_template={
                        Attribute.SENSITIVE: True,
                        Attribute.EXTRACTABLE: bool(spec.get("extractable")),
                    },
                )
    return {"ok": True}


def cmd_login(args: dict[str, Any]) -> dict[str, Any]:
    """Log in with ``pin`` and out again: the name of the error, or None."""
    import pkcs11

    try:
        with _open(args):
            pass
    except pkcs11.PKCS11Error as e:
        return {"error": type(e).__name__}
    return {"error": None}


if __name__ == "__main__":
    commands = {"objects": cmd_objects, "extract": cmd_extract, "make": cmd_make,
                "login": cmd_login}  # fmt: skip
    print(json.dumps(commands[sys.argv[1]](json.loads(sys.argv[2]))))
