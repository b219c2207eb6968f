"""The deployment files in ``deploy/``: each one checked by the tool that will read it.

- systemd: ``systemd-analyze verify`` and ``security --offline`` on the unit,
  ``systemd-sysusers`` / ``systemd-tmpfiles --root`` on the other two files, the
  hardening directives we promise, and ``MemoryDenyWriteExecute=yes`` proved by
  running the daemon under the kernel's ``PR_SET_MDWE`` (what systemd uses).
- Kubernetes: every manifest validated by kubernetes-validate (strict schema),
  the pod's security settings, and the ConfigMap's keymgr.toml through
  ``keymgr config check``.
- Dockerfile: parsed for the multi-stage build, a numeric non-root USER, the
  HEALTHCHECK and the ENTRYPOINT (no Docker daemon is needed or used).
- nginx: ``jwks.conf`` run in a real nginx on free loopback ports, serving a
  JWKS that keymgr wrote, with the headers verifiers and browsers rely on.

Tools that are missing are skipped with the reason, never silently passed.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO, Home
from tests.servers_common import free_port

DEPLOY = REPO / "deploy"
UNIT = DEPLOY / "systemd" / "keymgr.service"
K8S = DEPLOY / "kubernetes"
KEYMGR = Path(sys.executable).with_name("keymgr")


# --------------------------------------------------------------------------- helpers


def unit_directives(path: Path) -> dict[str, list[str]]:
    """``Key=value`` lines of a unit file, every value of a repeated key kept."""
    out: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def duration_seconds(text: str) -> int:
    """``90s``, ``1h``, ``30d``; a bare number is seconds (systemd's reading)."""
    if text.strip().isdigit():
        return int(text)
    return sum(int(n) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[u]
               for n, u in re.findall(r"(\d+)([smhd])", text))


def manifests() -> list[tuple[Path, dict[str, Any]]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                out.append((path, doc))
    return out


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in manifests() if doc["kind"] == kind]


# --------------------------------------------------------------------------- systemd


def test_unit_has_the_hardening_we_promise() -> None:
    """The directives the README and the issue promise, each with its expected value.

    Parsed here so that the check runs everywhere, even without systemd.
    """
    d = unit_directives(UNIT)
    expect = {
        "Type": "notify",
        "NotifyAccess": "main",
        "User": "keymgr",
        "StateDirectory": "keymgr",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "NoNewPrivileges": "yes",
        "CapabilityBoundingSet": "",
        "AmbientCapabilities": "",
        "MemoryDenyWriteExecute": "yes",
        "LockPersonality": "yes",
        "RestrictSUIDSGID": "yes",
        "RestrictNamespaces": "yes",
        "RestrictRealtime": "yes",
        "SystemCallArchitectures": "native",
        "UMask": "0077",
        "LimitCORE": "0",
        "KillSignal": "SIGTERM",
        "RestartPreventExitStatus": "2",
    }
    for key, value in expect.items():
        assert d.get(key) == [value], f"{key}= is {d.get(key)}, want {value!r}"
    assert "@system-service" in d["SystemCallFilter"]
    assert set(d["RestrictAddressFamilies"][0].split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert duration_seconds(d["WatchdogSec"][0]) >= 10
    assert any("HUP" in v for v in d["ExecReload"])
    assert d["ExecStart"][0].split()[-1] == "run"
    # The JWKS directory nginx serves is the one writable path outside the
    # unit's own directories, and it is where keymgr.toml publishes.
    cfg = tomllib.loads((DEPLOY / "systemd" / "keymgr.toml").read_text())
    jwks = Path(cfg["publishers"]["site"]["path"])
    assert any(jwks.is_relative_to(p) for p in d["ReadWritePaths"][0].split())
    assert cfg["daemon"]["state"].startswith("file:///var/lib/keymgr/")
    assert cfg["backends"]["local"]["path"].startswith("/var/lib/keymgr/")
    assert cfg["daemon"]["audit_log"].startswith("/var/log/keymgr/")
    assert d["LogsDirectory"] == ["keymgr"]
    # TimeoutStopSec leaves time for a pass to finish after SIGTERM.
    assert duration_seconds(d["TimeoutStopSec"][0]) >= 30


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_unit_passes_systemd_analyze_verify_and_security(tmp_path: Path) -> None:
    """``systemd-analyze verify`` (syntax, directives, executables) and the
    offline security score. ExecStart is pointed at this venv's keymgr, because
    verify insists that the binary exists on the machine doing the check."""
    unit = tmp_path / "keymgr.service"
    unit.write_text(UNIT.read_text().replace("/usr/bin/keymgr", str(KEYMGR)))
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "keymgr.service" not in proc.stderr, proc.stderr  # no warnings about our unit
    proc = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--threshold=20", "--no-pager",
         str(unit)],
        capture_output=True, text=True, timeout=60,
    )
    if "Unknown option" in proc.stderr or "unrecognized option" in proc.stderr:
        pytest.skip(f"this systemd-analyze has no offline security mode: {proc.stderr.strip()}")
    assert proc.returncode == 0, f"exposure above 2.0:\n{proc.stdout}\n{proc.stderr}"


@pytest.mark.skipif(
    shutil.which("systemd-sysusers") is None or shutil.which("systemd-tmpfiles") is None,
    reason="systemd-sysusers / systemd-tmpfiles not installed",
)
@pytest.mark.skipif(os.geteuid() != 0, reason="systemd-tmpfiles must chown to the new user")
def test_sysusers_and_tmpfiles_apply_to_a_scratch_root(tmp_path: Path) -> None:
    """The user and the JWKS directories come out as the unit expects them."""
    (tmp_path / "etc").mkdir()
    subprocess.run(["systemd-sysusers", f"--root={tmp_path}",
                    str(DEPLOY / "systemd" / "keymgr.sysusers.conf")],
                   check=True, capture_output=True, timeout=60)
    passwd = {ln.split(":")[0]: ln.split(":") for ln in
              (tmp_path / "etc" / "passwd").read_text().splitlines()}
    user = passwd["keymgr"]
    assert int(user[2]) < 1000, "a system user"
    assert user[5] == "/var/lib/keymgr" and user[6].endswith("nologin")
    subprocess.run(["systemd-tmpfiles", "--create", f"--root={tmp_path}",
                    str(DEPLOY / "systemd" / "keymgr.tmpfiles.conf")],
                   check=True, capture_output=True, timeout=60)
    well_known = tmp_path / "srv" / "jwks" / ".well-known"
    st = well_known.stat()
    assert st.st_uid == int(user[2]) and st.st_mode & 0o777 == 0o755  # nginx must traverse it


def test_systemd_config_passes_config_check(tmp_path: Path) -> None:
    """The shipped /etc/keymgr/keymgr.toml is valid as it stands (checked offline),
    and its publish_ahead covers the max-age nginx sends (see jwks.conf)."""
    path = DEPLOY / "systemd" / "keymgr.toml"
    # As shipped, on a machine that has none of its files: refused, naming the
    # master key (issue 18: config check catches what the first pass would).
    if not Path("/etc/keymgr/master.key").exists():
        proc = subprocess.run([str(KEYMGR), "--config", str(path), "config", "check"],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert "master_key_file: /etc/keymgr/master.key does not exist" in proc.stderr
    # Installed as deploy/systemd/README says, under a scratch root: ok.
    root = tmp_path / "root"
    text = path.read_text()
    for top in ("/etc/keymgr", "/var/lib/keymgr", "/var/log/keymgr", "/srv/jwks"):
        text = text.replace(top, f"{root}{top}")
    (root / "etc" / "keymgr").mkdir(parents=True)
    key = root / "etc" / "keymgr" / "master.key"
    key.write_bytes(base64.b64encode(os.urandom(32)) + b"\n")
    key.chmod(0o600)
    installed = root / "etc" / "keymgr" / "keymgr.toml"
    installed.write_text(text)
    proc = subprocess.run([str(KEYMGR), "--config", str(installed), "config", "check"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    cfg = tomllib.loads(path.read_text())
    nginx_max_age = int(re.search(r"max-age=(\d+)",
                                  (DEPLOY / "nginx" / "jwks.conf").read_text())[1])
    assert cfg["publishers"]["site"]["cache_control"] == f"public, max-age={nginx_max_age}"
    for ring in cfg["keyrings"].values():
        assert duration_seconds(ring["publish_ahead"]) >= nginx_max_age


PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1


def _mdwe_supported() -> bool:
    """Probe in a child: PR_SET_MDWE cannot be undone in the process that sets it."""
    code = (
        "import ctypes,sys;libc=ctypes.CDLL(None,use_errno=True);"
        f"sys.exit(0 if libc.prctl({PR_SET_MDWE},{PR_MDWE_REFUSE_EXEC_GAIN},0,0,0)==0 else 1)"
    )
    return sys.platform == "linux" and subprocess.run([sys.executable, "-c", code]).returncode == 0


#: Sets PR_SET_MDWE, then execs the command: the flag survives execve, so the
#: whole interpreter start-up and every library it loads run under it.
MDWE_WRAPPER = f"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) != 0:
    sys.exit("prctl(PR_SET_MDWE) failed: errno %d" % ctypes.get_errno())
os.execv(sys.argv[1], sys.argv[1:])
"""


@pytest.mark.skipif(not _mdwe_supported(), reason="kernel without PR_SET_MDWE (Linux >= 6.3)")
def test_daemon_runs_without_writable_executable_memory(home: Home) -> None:
    """``MemoryDenyWriteExecute=yes`` is safe: the daemon bootstraps a key, serves
    its probes and stops, the CLI signs, and boto3/hvac import and build a client,
    all under the kernel's refusal of W+X memory (systemd implements the
    directive with seccomp; PR_SET_MDWE is the same rule, enforced by the kernel).
    A W+X mapping made on purpose fails first, to prove the rule was on."""
    wrap = [sys.executable, "-c", MDWE_WRAPPER, sys.executable]
    probe = subprocess.run(
        [*wrap, "-c", "import mmap; mmap.mmap(-1, 4096, prot=7)"],
        capture_output=True, text=True, timeout=60,
    )
    assert probe.returncode != 0 and "PermissionError" in probe.stderr

    text = home.config.read_text().replace('listen = "127.0.0.1:9464"', 'listen = "127.0.0.1:0"')
    home.config.write_text(text)
    out = home.dir / "daemon.out"
    with open(out, "wb") as fo:
        proc = subprocess.Popen([*wrap, "-m", "keymgr.cli", "--config", str(home.config), "run"],
                                stdout=fo, stderr=subprocess.PIPE, cwd=home.dir, env=home.env())
    try:
        deadline = time.monotonic() + 30
        port = None
        while time.monotonic() < deadline and proc.poll() is None:
            for line in out.read_text().splitlines():
                ev = json.loads(line)
                if ev.get("event") == "daemon.started":
                    port = int(ev["listen"].rsplit(":", 1)[1])
            if port is not None and (home.dir / "state.json").exists():
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5):
                        break
                except (urllib.error.URLError, OSError):
                    pass
            time.sleep(0.1)
        else:
            raise AssertionError(f"daemon not ready under MDWE: {proc.poll()}")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            assert b"keymgr_keys" in r.read()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err.decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    sign = subprocess.run(
        [*wrap, "-m", "keymgr.cli", "--config", str(home.config), "sign", "default",
         "--claims", '{"sub":"a"}'],
        capture_output=True, text=True, timeout=60, cwd=home.dir, env=home.env(),
    )
    assert sign.returncode == 0 and sign.stdout.count(".") == 2, sign.stderr
    libs = subprocess.run(
        [*wrap, "-c", "import boto3, hvac; boto3.session.Session().client("
         "'kms', region_name='eu-west-1', aws_access_key_id='x', aws_secret_access_key='y')"],
        capture_output=True, text=True, timeout=120,
    )
    assert libs.returncode == 0, libs.stderr


# --------------------------------------------------------------------------- Kubernetes


@pytest.mark.parametrize("version", ["1.29.0", "latest"])
def test_every_manifest_validates_strictly(version: str) -> None:
    """Schema validation with unknown fields rejected (a misspelt securityContext
    field would otherwise be dropped silently by the API server), against the
    oldest Kubernetes version we support and the newest the validator knows."""
    import kubernetes_validate

    v = kubernetes_validate.latest_version() if version == "latest" else version
    docs = manifests()
    assert {d["kind"] for _, d in docs} >= {
        "Deployment", "ServiceAccount", "ConfigMap", "Secret", "PodDisruptionBudget",
        "Service", "NetworkPolicy", "Namespace",
    }
    assert "PersistentVolumeClaim" not in {d["kind"] for _, d in docs}, "stateless: no PVC"
    for path, doc in docs:
        try:
            kubernetes_validate.validate(doc, v, strict=True)
        except kubernetes_validate.ValidationError as e:
            raise AssertionError(f"{path.name}: {doc['kind']}: {e.message} at {e.path}") from None
        assert doc["metadata"].get("namespace", "keymgr") == "keymgr"
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    shipped = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
    assert set(listed) == shipped, "kustomization.yaml must list every manifest"


def test_deployment_security_and_probes() -> None:
    """Two replicas, non-root, read-only root, no privilege escalation, no
    capabilities, RuntimeDefault seccomp, probes on /healthz and /readyz, and
    resource requests and limits: what the restricted Pod Security Standard and
    the issue ask for. Stateless (issue 17): no volume but the config, the
    audit chain kept in the shared state store, nothing written in the pod."""
    (dep,) = by_kind("Deployment")
    spec = dep["spec"]
    assert spec["replicas"] == 2
    pod = spec["template"]["spec"]
    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] > 0
    assert psc["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] == by_kind("ServiceAccount")[0]["metadata"]["name"]
    (c,) = pod["containers"]
    sc = c["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["runAsNonRoot"] is True
    assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add")
    assert sc["seccompProfile"]["type"] == "RuntimeDefault"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][kind])
    # Credentials come from a Secret, never inline.
    secret_names = {s["metadata"]["name"] for s in by_kind("Secret")}
    assert any(e.get("secretRef", {}).get("name") in secret_names for e in c["envFrom"])
    for env in c.get("env", []):
        assert "SECRET" not in env["name"] and "TOKEN" not in env["name"]
    # The config comes from the ConfigMap, at the path KEYMGR_CONFIG names.
    (cm,) = by_kind("ConfigMap")
    vols = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    config_path = next(e["value"] for e in c["env"] if e["name"] == "KEYMGR_CONFIG")
    mount = mounts[str(Path(config_path).parent)]
    assert mount.get("readOnly") is True
    assert vols[mount["name"]]["configMap"]["name"] == cm["metadata"]["name"]
    # No volume besides the config: the audit chain is in the state store (no
    # audit = "file", no local mirror that would need a writable volume).
    cfg = tomllib.loads(cm["data"]["keymgr.toml"])
    assert list(vols) == [mount["name"]] and list(mounts) == [mount["mountPath"]]
    assert "audit_log" not in cfg["daemon"] and cfg["daemon"].get("audit", "store") == "store"
    # The pod can stop cleanly: a pass finishes before SIGKILL.
    assert pod["terminationGracePeriodSeconds"] >= 30
    # PDB and metrics Service select these pods; ports line up with the config.
    labels = spec["template"]["metadata"]["labels"]
    (pdb,) = by_kind("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["minAvailable"] == 1
    (svc,) = by_kind("Service")
    assert svc["spec"]["selector"].items() <= labels.items()
    port = int(cfg["daemon"]["listen"].rsplit(":", 1)[1])
    assert cfg["daemon"]["listen"].startswith("0.0.0.0:"), "kubelet probes the pod IP"
    assert c["ports"][0]["containerPort"] == port == svc["spec"]["ports"][0]["port"]


def test_configmap_config_passes_config_check(tmp_path: Path) -> None:
    """The keymgr.toml in the ConfigMap, written out as the pod would see it, passes
    ``keymgr config check`` offline (no AWS call: backends connect lazily),
    and its state store is shared (s3:// or vault://) as two replicas need."""
    (cm,) = by_kind("ConfigMap")
    text = cm["data"]["keymgr.toml"]
    cfg = tomllib.loads(text)
    assert cfg["daemon"]["state"].split(":", 1)[0] in ("s3", "vault")
    path = tmp_path / "keymgr.toml"
    path.write_text(text)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KEYMGR_", "AWS_"))}
    env.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
    proc = subprocess.run([str(KEYMGR), "--config", str(path), "config", "check"],
                          capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for ring in cfg["keyrings"].values():
        for pub in ring["publishers"]:
            cc = cfg["publishers"][pub].get("cache_control", "")
            m = re.search(r"max-age=(\d+)", cc)
            assert m is None or int(m[1]) <= duration_seconds(ring["publish_ahead"])


# --------------------------------------------------------------------------- Dockerfile


def test_dockerfile_multistage_nonroot_healthcheck() -> None:
    """Parsed, not built (no Docker daemon in CI): python:3.11-slim stages, a
    numeric non-root USER in the final stage, a HEALTHCHECK on /healthz, and
    ``keymgr run`` as the entrypoint, in exec form so SIGTERM reaches it."""
    lines: list[str] = []
    for raw in (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ").splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            lines.append(line)
    args = {m[1]: m[2] for ln in lines if (m := re.match(r"ARG (\w+)=(\S+)", ln))}
    froms = [ln.split()[1] for ln in lines if ln.startswith("FROM ")]
    assert len(froms) >= 2, "multi-stage"
    for image in froms:
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], image)
        assert image.startswith("python:3.11-slim"), image
    final = lines[max(i for i, ln in enumerate(lines) if ln.startswith("FROM "))]
    tail = lines[lines.index(final):]
    assert any(ln.startswith("COPY --from=") for ln in tail), "the runtime copies the build"
    (user,) = [ln.split()[1] for ln in tail if ln.startswith("USER ")]
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) > 0 and (not gid or int(gid) > 0)
    # The K8s pod runs as that same uid.
    (dep,) = by_kind("Deployment")
    assert dep["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == int(uid)
    (health,) = [ln for ln in tail if ln.startswith("HEALTHCHECK ")]
    assert "/healthz" in health
    (entry,) = [ln for ln in tail if ln.startswith("ENTRYPOINT ")]
    assert json.loads(entry.split(None, 1)[1]) == ["keymgr", "run"]
    assert not any(ln.startswith("ADD ") for ln in lines)


# --------------------------------------------------------------------------- nginx


def _self_signed(dir: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    crt, pem = dir / "cert.pem", dir / "key.pem"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    return crt, pem


@pytest.fixture
def nginx(home: Home, tmp_path: Path) -> Iterator[tuple[int, int, ssl.SSLContext]]:
    """deploy/nginx/jwks.conf in a real nginx, serving the home's public/ dir.

    Only what is machine-specific is rewritten: the listen ports (free loopback
    ports; the IPv6 listens are dropped), the certificate (self-signed for
    127.0.0.1), and the root. Everything else is the shipped file.
    """
    exe = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists()
                                     else None)
    if exe is None:
        pytest.skip("nginx not installed (Debian: apt-get install nginx-light)")
    run = tmp_path / "nginx"
    run.mkdir()
    crt, key = _self_signed(run)
    # Workers run as root here only because pytest's temp dirs are 0700 root.
    user = "user root;" if os.geteuid() == 0 else ""
    (run / "nginx.conf").write_text(f"""
{user}
worker_processes 1;
pid {run}/nginx.pid;
error_log {run}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {run}/body;
    proxy_temp_path {run}/proxy;
    fastcgi_temp_path {run}/fastcgi;
    uwsgi_temp_path {run}/uwsgi;
    scgi_temp_path {run}/scgi;
    include {run}/jwks.conf;
}}
""")
    proc = None
    for _attempt in range(5):  # another process may take a "free" port first
        https, http = free_port(), free_port()
        conf = (DEPLOY / "nginx" / "jwks.conf").read_text()
        conf = re.sub(r"^\s*listen \[::\]:.*$", "", conf, flags=re.M)
        conf = conf.replace("listen 443 ssl", f"listen 127.0.0.1:{https} ssl")
        conf = conf.replace("listen 80;", f"listen 127.0.0.1:{http};")
        conf = re.sub(r"ssl_certificate\s+\S+;", f"ssl_certificate {crt};", conf)
        conf = re.sub(r"ssl_certificate_key\s+\S+;", f"ssl_certificate_key {key};", conf)
        conf = conf.replace("root /srv/jwks;", f"root {home.dir / 'public'};")
        (run / "jwks.conf").write_text(conf)
        test = subprocess.run([exe, "-t", "-p", str(run), "-c", str(run / "nginx.conf")],
                              capture_output=True, text=True, timeout=30)
        assert test.returncode == 0, test.stderr
        proc = subprocess.Popen([exe, "-p", str(run), "-c", str(run / "nginx.conf"),
                                 "-g", "daemon off;"], stderr=subprocess.PIPE)
        # nginx writes its pid file once its sockets are bound.
        deadline = time.monotonic() + 15
        while proc.poll() is None and not (run / "nginx.pid").exists():
            assert time.monotonic() < deadline, "nginx did not start within 15 s"
            time.sleep(0.05)
        while proc.poll() is None:  # and then for the TLS port to accept
            try:
                with socket.create_connection(("127.0.0.1", https), timeout=1):
                    break
            except OSError:
                assert time.monotonic() < deadline, "nginx did not listen within 15 s"
                time.sleep(0.05)
        if proc.poll() is None:
            break
        err = proc.stderr.read().decode() if proc.stderr else ""
        assert "Address already in use" in err, f"nginx did not start: {err}"
    else:
        raise AssertionError("nginx found no free ports in 5 attempts")
    ctx = ssl.create_default_context(cafile=str(crt))
    try:
        yield https, http, ctx
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _request(url: str, ctx: ssl.SSLContext | None, method: str = "GET",
             headers: dict[str, str] | None = None) -> tuple[int, Any, bytes]:
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *a: Any, **k: Any) -> None:
            return None

    opener = urllib.request.build_opener(NoRedirect, urllib.request.HTTPSHandler(context=ctx))
    req = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with opener.open(req, timeout=5) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def test_nginx_serves_the_jwks_with_cache_cors_and_etag(
    home: Home, nginx: tuple[int, int, ssl.SSLContext]
) -> None:
    """What verifiers and browsers get from deploy/nginx/jwks.conf, over TLS.

    The JWKS is written by keymgr itself (reconcile, then rotate), so the test
    also shows that an atomic replace is picked up at once with a new ETag.
    """
    https, http, ctx = nginx
    url = f"https://127.0.0.1:{https}/.well-known/jwks.json"
    assert _request(url, ctx)[0] == 404  # nothing published yet
    status, headers, _ = _request(url, ctx)
    assert headers.get("Cache-Control") is None, "a 404 must not be cached"

    home.run("reconcile", check=True)
    status, headers, body = _request(url, ctx)
    assert status == 200
    assert body == home.jwks_path.read_bytes()
    assert len(json.loads(body)["keys"]) == 1
    assert headers["Content-Type"] == "application/json"
    assert headers["Cache-Control"] == "public, max-age=300"
    assert headers["Access-Control-Allow-Origin"] == "*"
    assert headers["X-Content-Type-Options"] == "nosniff"
    etag = headers["ETag"]
    assert etag and not etag.startswith("W/")

    assert _request(url, ctx, headers={"If-None-Match": etag})[0] == 304
    status, headers, _ = _request(url, ctx, "OPTIONS", {
        "Origin": "https://app.example", "Access-Control-Request-Method": "GET"})
    assert status == 204
    assert headers["Access-Control-Allow-Origin"] == "*"
    assert "GET" in headers["Access-Control-Allow-Methods"]
    assert _request(url, ctx, "HEAD")[0] == 200
    assert _request(url, ctx, "POST")[0] == 405
    assert _request(f"https://127.0.0.1:{https}/.well-known/", ctx)[0] == 404
    assert _request(f"https://127.0.0.1:{https}/", ctx)[0] == 404

    # Plain HTTP only redirects to HTTPS.
    status, headers, _ = _request(f"http://127.0.0.1:{http}/.well-known/jwks.json", None)
    assert status == 301 and headers["Location"].startswith("https://")

    home.run("rotate", "default", check=True)
    status, headers, body = _request(url, ctx, headers={"If-None-Match": etag})
    assert status == 200 and headers["ETag"] != etag
    assert len(json.loads(body)["keys"]) == 2
