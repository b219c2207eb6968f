"""Signing through AWS KMS (moto) and Vault transit (OpenBao): requests and latency.

    .venv/bin/python benchmarks/bench_sign_remote.py [--only kms|vault] [--calls 300]
                                                    [--smoke] [--json FILE]

Starts a moto server and an OpenBao dev server on loopback ports, bootstraps
an ES256 and an RS256 (2048-bit) ring on each backend through the real code
path (state in a local file), then for each ring:

- counts every backend request while signing: with a botocore ``before-call``
  event hook on the backend's KMS client, with a ``requests`` response hook on
  the Vault client's session. Steady state must be exactly one request per
  signature (``Sign`` / ``POST transit/sign``) and never a public-key read;
  the first signature of a fresh process is shown apart (it resolves the key);
- measures per-call wall latency, interleaved call by call, of
  ``KeyManager.sign`` and of the bare SDK call signing the same input with the
  same key (``boto3`` ``kms.sign`` / ``hvac`` ``transit.sign_data``), and
  reports p50 and p99 and their ratios (target: keymgr within 1.1x of bare).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import _common as c

CLAIMS = {"iss": "https://issuer.example.com", "sub": "user-1", "aud": "api",
          "iat": 1893456000, "exp": 1893456900}
KMS_ALGS = {"ES256": "ECDSA_SHA_256", "RS256": "RSASSA_PKCS1_V1_5_SHA_256"}


def kms_section(url: str) -> str:
    return (f'\n[backends.kms]\ntype = "aws-kms"\nendpoint_url = "{url}"\nregion = "us-east-1"\n'
            'rsa_key_spec = "RSA_2048"\n')


def vault_section(url: str) -> str:
    return f'\n[backends.vault]\ntype = "vault-transit"\nurl = "{url}"\nrsa_bits = 2048\n'


def rings_for(backend: str) -> dict[str, str]:
    return {f"{backend}_{alg.lower()}": alg for alg in ("ES256", "RS256")}


def home(tmp: Path, backend: str, section: str) -> Path:
    rings = rings_for(backend)
    return c.write_home(tmp / backend, {}, extra=section + "".join(
        c.RING_TEMPLATE.format(name=r, alg=a, backend=backend, period="30d")
        for r, a in rings.items()))


def kms_hook(km: Any, counter: Counter[str]) -> None:
    client = km.config.backends["kms"].client
    client.meta.events.register("before-call.kms.*",
                                lambda model, **_: counter.update([model.name]))


def vault_hook(km: Any, counter: Counter[str]) -> None:
    session = km.config.backends["vault"].vault.session

    def note(resp: Any, *args: Any, **kwargs: Any) -> Any:
        path = resp.request.path_url.split("?")[0]
        # /v1/transit/sign/NAME -> "POST transit/sign", keys by kind not by name
        parts = path.split("/")[2:4]
        counter.update([f"{resp.request.method} {'/'.join(parts)}"])
        return resp

    session.hooks["response"].append(note)


def bare_kms(url: str, km: Any, ring: str, kid: str, alg: str) -> Any:
    import boto3

    backend = km.config.backends["kms"]
    key_id = backend._keys[(ring, kid)].key_id  # what keymgr's signer resolved
    client = boto3.client("kms", endpoint_url=url, region_name="us-east-1")
    sign = client.sign

    def call(data: bytes) -> bytes:
        return bytes(sign(KeyId=key_id, Message=data, MessageType="RAW",
                          SigningAlgorithm=KMS_ALGS[alg])["Signature"])

    return call


def bare_vault(url: str, token: str, km: Any, ring: str, kid: str, alg: str) -> Any:
    import hvac

    backend = km.config.backends["vault"]
    name = backend._index[ring][kid].name  # what keymgr's signer resolved
    client = hvac.Client(url=url, token=token)
    params: dict[str, Any] = {"marshaling_algorithm": "jws", "key_version": 1,
                              "hash_algorithm": "sha2-256"}
    if alg.startswith("RS"):
        params["signature_algorithm"] = "pkcs1v15"
    sign = client.secrets.transit.sign_data

    def call(data: bytes) -> str:
        return str(sign(name, hash_input=base64.b64encode(data).decode(), **params)
                   ["data"]["signature"])

    return call


def measure(kind: str, cfg: Path, server: Any, calls: int) -> list[dict[str, Any]]:
    import jwt

    from keymgr.manager import KeyManager

    km = KeyManager.from_config(cfg, actor="bench")
    res = km.reconcile(c.T0)
    assert res.ok, res.failures
    hook = kms_hook if kind == "kms" else vault_hook
    out = []
    for ring, alg in rings_for(kind).items():
        # A fresh process's first signature: resolving the key is allowed once.
        cold = KeyManager.from_config(cfg, actor="bench")
        first: Counter[str] = Counter()
        hook(cold, first)
        cold.sign(ring, CLAIMS)
        first_requests = dict(first)
        requests: Counter[str] = Counter()
        hook(cold, requests)
        token = cold.sign(ring, CLAIMS)
        kid = jwt.get_unverified_header(token)["kid"]
        signing_input = token.rsplit(".", 1)[0].encode()
        bare = (bare_kms(server.url, cold, ring, kid, alg) if kind == "kms"
                else bare_vault(server.addr, server.token, cold, ring, kid, alg))
        requests.clear()
        lat = c.latencies(
            {"keymgr": lambda r=ring, k=cold: k.sign(r, CLAIMS),
             "bare": lambda b=bare, s=signing_input: b(s)},
            number=calls // 3 or 1, rounds=3,
        )
        n = len(lat["keymgr"]) + 1  # + the warm-up call of latencies()
        per_sig = dict(requests)
        p50 = {k: c.percentile(v, 50) for k, v in lat.items()}
        p99 = {k: c.percentile(v, 99) for k, v in lat.items()}
        sign_ops = {k: v for k, v in per_sig.items() if "sign" in k.lower()}
        others = {k: v for k, v in per_sig.items() if k not in sign_ops}
        out.append({
            "backend": kind, "ring": ring, "alg": alg, "signatures": n,
            "first_signature_requests": first_requests,
            "requests": per_sig,
            "one_per_signature": sum(sign_ops.values()) == n and not others,
            "keymgr_p50_ms": p50["keymgr"] * 1e3, "bare_p50_ms": p50["bare"] * 1e3,
            "keymgr_p99_ms": p99["keymgr"] * 1e3, "bare_p99_ms": p99["bare"] * 1e3,
            "ratio_p50": p50["keymgr"] / p50["bare"], "ratio_p99": p99["keymgr"] / p99["bare"],
        })
    return out


def main() -> int:
    p = c.parser(__doc__)
    p.add_argument("--only", choices=("kms", "vault"))
    p.add_argument("--calls", type=int, default=300, help="signatures per candidate and ring")
    args = p.parse_args()
    c.quiet_logs()
    calls = 6 if args.smoke else args.calls
    c.header("bench_sign_remote: KMS (moto) and Vault transit (OpenBao) signing")
    tmp = Path(tempfile.mkdtemp(prefix="keymgr-bench-remote-"))
    results: list[dict[str, Any]] = []
    servers: list[Any] = []
    try:
        if args.only in (None, "kms"):
            moto = c.start_moto(tmp)
            servers.append(moto)
            c.aws_env(moto.url)
            results += measure("kms", home(tmp, "kms", kms_section(moto.url)), moto, calls)
        if args.only in (None, "vault"):
            bao = c.start_bao(tmp)
            servers.append(bao)
            os.environ["VAULT_TOKEN"] = bao.token
            results += measure("vault", home(tmp, "vault", vault_section(bao.addr)), bao, calls)
    finally:
        for s in servers:
            s.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    print("| backend | alg | requests while signing N (steady state) | first signature "
          "of a process | keymgr p50 | bare p50 | ratio | keymgr p99 | bare p99 | ratio |")
    print("| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        reqs = ", ".join(f"{k}={v}" for k, v in sorted(r["requests"].items()))
        first = ", ".join(f"{k}={v}" for k, v in sorted(r["first_signature_requests"].items()))
        print(f"| {r['backend']} | {r['alg']} | N={r['signatures']}: {reqs} | {first} | "
              f"{r['keymgr_p50_ms']:.2f} ms | {r['bare_p50_ms']:.2f} ms | {r['ratio_p50']:.2f}x | "
              f"{r['keymgr_p99_ms']:.2f} ms | {r['bare_p99_ms']:.2f} ms | {r['ratio_p99']:.2f}x |")
    one = all(r["one_per_signature"] for r in results)
    fast = all(r["ratio_p50"] <= 1.1 and r["ratio_p99"] <= 1.1 for r in results)
    print(f"\nexactly one backend request per signature, no public-key read: "
          f"{c.verdict(one, args.smoke)}")
    print(f"p50 and p99 within 1.1x of the bare SDK call: {c.verdict(fast, args.smoke)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"sign_remote": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
