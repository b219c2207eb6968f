"""A Python verifier process for the rollover soak (``python -m benchmarks.soak``).

It behaves like a real service: it fetches the JWKS over HTTP and caches it the
way its library does, and never looks at keymgr's state or code. Its
algorithm allowlist is ``--alg`` (comma-separated: during an algorithm
migration it holds the old and the new ones).

- ``--kind pyjwt``: PyJWT's ``PyJWKClient`` with its JWK-set cache
  (``lifespan``) and its unknown-kid refresh cooldown (``cooldown_duration``).
- ``--kind jwcrypto``: a jwcrypto ``JWKSet`` cached like an HTTP client does:
  for the response's ``Cache-Control: max-age`` (``--lifetime`` when absent),
  refreshed early on an unknown kid only once ``--cooldown`` has passed since
  the last fetch.

Tokens come from the issuer's queue file (JSON lines, tailed); every token is
verified when it arrives ("fresh") and once more shortly before it expires
("late", ``--late-margin`` seconds before ``exp``), when only keys kept
published through ``retire_grace`` can still verify it. One JSON line per
check (and per JWKS fetch) goes to ``--out``.
"""

from __future__ import annotations

import argparse
import heapq
import json
import re
import sys
import time
import urllib.request
from typing import Any

MAX_AGE = re.compile(r"(?:^|,)\s*(?:s-maxage|max-age)\s*=\s*\"?(\d+)\"?\s*(?=,|$)", re.I)


class Out:
    def __init__(self, path: str) -> None:
        self.f = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115

    def write(self, **rec: Any) -> None:
        rec.setdefault("t", time.time())
        self.f.write(json.dumps(rec, separators=(",", ":")) + "\n")


def _reason(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".replace("\n", " ")[:300]


class PyJWTVerifier:
    def __init__(self, a: argparse.Namespace, out: Out) -> None:
        import jwt

        class LoggingClient(jwt.PyJWKClient):
            def fetch_data(self) -> Any:
                data = super().fetch_data()
                out.write(ev="fetch", kids=sorted(k.get("kid", "") for k in data.get("keys", [])))
                return data

        self.jwt = jwt
        self.client = LoggingClient(
            a.url,
            cache_jwk_set=True,
            lifespan=a.lifetime,
            cooldown_duration=a.cooldown,
            timeout=a.timeout,
        )
        self.a = a

    def verify(self, token: str) -> None:
        key = self.client.get_signing_key_from_jwt(token)
        self.jwt.decode(
            token,
            key.key,
            algorithms=self.a.algs,
            leeway=self.a.leeway,
            options={"require": ["exp", "iat"]},
        )


class JwcryptoVerifier:
    def __init__(self, a: argparse.Namespace, out: Out) -> None:
        from jwcrypto import jwk, jwt

        self.jwk, self.jwt = jwk, jwt
        self.a, self.out = a, out
        self.keyset: Any = None
        self.fetched = 0.0
        self.lifetime = a.lifetime

    def fetch(self) -> None:
        with urllib.request.urlopen(self.a.url, timeout=self.a.timeout) as resp:
            body = resp.read()
            cc = resp.headers.get("Cache-Control")
        ages = [int(m) for m in MAX_AGE.findall(cc or "")]
        self.keyset = self.jwk.JWKSet.from_json(body)
        self.fetched = time.monotonic()
        self.lifetime = float(max(ages)) if ages else self.a.lifetime
        kids = sorted(k.get("kid") or "" for k in json.loads(body).get("keys", []))
        self.out.write(ev="fetch", kids=kids, max_age=max(ages) if ages else None)

    def verify(self, token: str) -> None:
        age = time.monotonic() - self.fetched
        if self.keyset is None or age >= self.lifetime:
            self.fetch()
        kid = json.loads(_b64(token.split(".", 1)[0])).get("kid")
        if self.keyset.get_key(kid) is None and time.monotonic() - self.fetched >= self.a.cooldown:
            self.fetch()
        t = self.jwt.JWT(
            algs=self.a.algs, expected_type="JWS", check_claims={"exp": None, "iat": None}
        )
        t.leeway = int(self.a.leeway)
        t.deserialize(token, self.keyset)
        json.loads(t.claims)


def _b64(s: str) -> bytes:
    import base64

    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--kind", choices=("pyjwt", "jwcrypto"), required=True)
    p.add_argument("--url", required=True)
    p.add_argument("--queue", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--alg", required=True, help="the algorithms allowed, comma-separated")
    p.add_argument("--lifetime", type=float, required=True, help="JWKS cache lifetime (s)")
    p.add_argument("--cooldown", type=float, required=True, help="s between unknown-kid refreshes")
    p.add_argument("--leeway", type=float, required=True, help="clock skew allowance (s)")
    p.add_argument("--late-margin", type=float, default=0.5)
    p.add_argument("--timeout", type=float, default=5.0)
    a = p.parse_args()
    a.algs = [x for x in a.alg.split(",") if x]

    out = Out(a.out)
    verifier = PyJWTVerifier(a, out) if a.kind == "pyjwt" else JwcryptoVerifier(a, out)
    late: list[tuple[float, int, dict[str, Any]]] = []
    pos, buf, ended = 0, b"", False

    def check(rec: dict[str, Any], phase: str) -> None:
        now = time.time()
        if now >= rec["exp"]:
            # Expired by the clock: a rejection would be right, so it is no test.
            out.write(ev="skip", seq=rec["seq"], phase=phase, why="expired before checked")
            return
        try:
            verifier.verify(rec["token"])
            out.write(ev="check", seq=rec["seq"], phase=phase, ok=True, kid=rec["kid"])
        except Exception as e:  # every library error is a rejection to report
            out.write(
                ev="check", seq=rec["seq"], phase=phase, ok=False, kid=rec["kid"], reason=_reason(e)
            )

    with open(a.queue, "rb") as q:
        while not ended or late:
            busy = False
            if not ended:
                q.seek(pos)
                chunk = q.read()
                pos += len(chunk)
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    rec = json.loads(line)
                    if rec.get("end"):
                        ended = True
                        break
                    check(rec, "fresh")
                    heapq.heappush(late, (rec["exp"] - a.late_margin, rec["seq"], rec))
                    busy = True
            while late and late[0][0] <= time.time():
                check(heapq.heappop(late)[2], "late")
                busy = True
            if not busy:
                time.sleep(0.01)
    out.write(ev="done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
