"""Signing throughput on the local backend: KeyManager.sign vs PyJWT vs bare cryptography.

    .venv/bin/python benchmarks/bench_sign_local.py [--smoke] [--json FILE]

For each algorithm (ES256, RS256 with 2048- and 3072-bit keys, PS256, EdDSA) a
ring is bootstrapped through the real code path, then three candidates sign the
same claims with the same private key, interleaved round-robin, best of several
rounds, timed on this thread's CPU clock:

- ``keymgr``  ``KeyManager.sign(ring, claims)`` (cached signer and header, the
  store freshness check included);
- ``pyjwt``   ``jwt.encode(claims, key, algorithm, headers={"kid": ...})``;
- ``bare``    ``key.sign(signing_input, ...)`` of keymgr's own signing input:
  the crypto alone, no JSON, no base64, no JOSE signature encoding. The limit.

Ratios are throughputs (higher is better for keymgr): ``vs pyjwt`` =
t(pyjwt) / t(keymgr), target >= 0.95; ``vs bare`` = t(bare) / t(keymgr),
target >= 0.85. Every keymgr token is also verified with PyJWT once. The last
column is ``KeyManager.sign`` with the signature stubbed out (a constant): what
keymgr adds around the crypto, measured alone.

Also counted: calls of ``jose.compact_json`` (the stdlib JSON encoder) per
signature once the ring's signer is cached. It must stay 0: the JWS header is
encoded once per key and claims go through orjson, which is why that encoder
is the plain public ``json.JSONEncoder`` and not a faster private one.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common as c

CLAIMS: dict[str, Any] = {
    "iss": "https://issuer.example.com",
    "sub": "user-1234567890",
    "aud": "api.example.com",
    "iat": 1893456000,
    "exp": 1893456900,
    "jti": "5f0c6a9e-8a43-4d55-9d1e-2d7b4c1e6f70",
}

#: (label, ring, backend, JWS alg)
CASES = [
    ("ES256", "es256", "local", "ES256"),
    ("RS256-2048", "rs256_2048", "local", "RS256"),
    ("RS256-3072", "rs256_3072", "local3072", "RS256"),
    ("PS256-2048", "ps256_2048", "local", "PS256"),
    ("EdDSA", "eddsa", "local", "EdDSA"),
]


def bare_signer(key: Any, alg: str) -> Any:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, padding

    sign = key.sign
    if alg == "EdDSA":
        return sign
    if alg.startswith("ES"):
        ecdsa = ec.ECDSA(hashes.SHA256())
        return lambda data: sign(data, ecdsa)
    digest = hashes.SHA256()
    pad: Any = (
        padding.PSS(mgf=padding.MGF1(digest), salt_length=digest.digest_size)
        if alg.startswith("PS")
        else padding.PKCS1v15()
    )
    return lambda data: sign(data, pad, digest)


def stdlib_json_calls(km: Any, ring: str, n: int) -> int:
    """Calls of ``jose.compact_json`` while ``km`` signs ``n`` times (warm)."""
    from keymgr import jose

    km.sign(ring, CLAIMS)
    real = jose.compact_json
    calls = 0

    def counting(obj: Any) -> str:
        nonlocal calls
        calls += 1
        return real(obj)

    jose.compact_json = counting
    try:
        for _ in range(n):
            km.sign(ring, CLAIMS)
    finally:
        jose.compact_json = real
    return calls


def main() -> int:
    args = c.parser(__doc__).parse_args()
    import jwt

    from keymgr.manager import KeyManager

    c.quiet_logs()
    c.header("bench_sign_local: KeyManager.sign vs PyJWT jwt.encode vs bare cryptography sign")
    tmp = Path(tempfile.mkdtemp(prefix="keymgr-bench-sign-"))
    rings = {ring: alg for _, ring, _, alg in CASES}
    cfg = c.write_home(
        tmp,
        {},
        extra="".join(
            c.RING_TEMPLATE.format(name=ring, alg=alg, backend=backend, period="30d")
            for _, ring, backend, alg in CASES
        )
        + (
            '\n[backends.local3072]\ntype = "file"\npath = "keys3072"\n'
            f'master_key_file = "master3072.key"\nrsa_bits = {2048 if args.smoke else 3072}\n'
        ),
    )
    shutil.copy(tmp / "master.key", tmp / "master3072.key")
    km = KeyManager.from_config(cfg, actor="bench")
    res = km.reconcile(c.T0)
    assert res.ok, res.failures
    state = km.state()
    results: list[dict[str, Any]] = []
    number_scale = 0.05 if args.smoke else 1.0
    repeat = 2 if args.smoke else 25
    for label, ring, backend_name, alg in CASES:
        key_rec = state.ring(ring).active
        assert key_rec is not None and key_rec.alg == rings[ring]
        kid = key_rec.kid
        backend: Any = km.config.backends[backend_name]
        private = backend._load(ring, kid)[1]  # the benchmark's own reference copy
        token = km.sign(ring, CLAIMS)
        public = private.public_key()
        assert jwt.decode(token, public, algorithms=[alg], audience=CLAIMS["aud"],
                          options={"verify_exp": False, "verify_iat": False}) == CLAIMS
        header = jwt.get_unverified_header(token)
        assert header == {"alg": alg, "kid": kid, "typ": "JWT"}, header
        signing_input = token.rsplit(".", 1)[0].encode()
        bare = bare_signer(private, alg)
        headers = {"kid": kid}
        # The same KeyManager path with the signature itself stubbed out: what
        # keymgr adds around the crypto (claims JSON, base64url, freshness check).
        stub = KeyManager.from_config(cfg, actor="bench")
        stub.sign(ring, CLAIMS)
        sig = km._sign_cache[ring].signer(signing_input)
        stub._sign_cache[ring] = dataclasses.replace(
            stub._sign_cache[ring], signer=lambda data, sig=sig: sig
        )
        stub._sign_fresh_until = 1 << 62  # keep the stub entry for the whole run
        candidates = {
            "stub": lambda ring=ring, stub=stub: stub.sign(ring, CLAIMS),
            "keymgr": lambda ring=ring: km.sign(ring, CLAIMS),
            "pyjwt": lambda p=private, a=alg, h=headers: jwt.encode(
                CLAIMS, p, algorithm=a, headers=h
            ),
            "bare": lambda b=bare, s=signing_input: b(s),
        }
        # ~20 ms per timed chunk, whatever the algorithm costs.
        t0 = time.thread_time()
        for _ in range(20):
            bare(signing_input)
        per = max((time.thread_time() - t0) / 20, 1e-6)
        number = max(10, int(0.03 / per * number_scale))
        best = c.interleaved(candidates, number=number, repeat=repeat)
        json_calls = stdlib_json_calls(km, ring, 100 if args.smoke else 1000)
        assert json_calls == 0, f"{label}: jose.compact_json on the signing path ({json_calls})"
        vs_pyjwt = best["pyjwt"] / best["keymgr"]
        vs_bare = best["bare"] / best["keymgr"]
        results.append(
            {
                "alg": label,
                "keymgr_us": best["keymgr"] * 1e6,
                "pyjwt_us": best["pyjwt"] * 1e6,
                "bare_us": best["bare"] * 1e6,
                "jose_us": best["stub"] * 1e6,
                "stdlib_json_calls": json_calls,
                "vs_pyjwt": vs_pyjwt,
                "vs_bare": vs_bare,
                "ok": vs_pyjwt >= 0.95 and vs_bare >= 0.85,
            }
        )
    print()
    print("| alg | keymgr | PyJWT | bare sign | keymgr/PyJWT (>= 0.95) | keymgr/bare (>= 0.85) "
          "| keymgr, signature stubbed |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        print(
            f"| {r['alg']} | {r['keymgr_us']:.1f} us | {r['pyjwt_us']:.1f} us | "
            f"{r['bare_us']:.1f} us | {r['vs_pyjwt']:.2f}x | {r['vs_bare']:.2f}x | "
            f"{r['jose_us']:.1f} us |"
        )
    n = 100 if args.smoke else 1000
    counts = ", ".join(f"{r['alg']} {r['stdlib_json_calls']}" for r in results)
    print(f"\njose.compact_json (stdlib JSON) calls in {n} warm signatures: {counts}")
    ok = all(r["ok"] for r in results)
    print(f"\nthroughput ratios (per-call CPU time, best of {repeat} interleaved rounds): "
          f"{c.verdict(ok, args.smoke)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"sign_local": results}, indent=2))
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
