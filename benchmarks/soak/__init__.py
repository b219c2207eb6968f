"""Rollover soak: no verifier ever rejects a valid token because of a rotation.

Runs the real daemon (``python -m keymgr.cli --config X run``) with periods of
seconds instead of days, and around it:

- an **issuer** thread minting tokens continuously through the Python API
  (``KeyManager.from_config(path).sign(ring, claims, ttl=..., now=...)``), each
  with its clock skewed by up to ``--skew`` seconds either way (the skewed
  ``now`` becomes ``iat``/``exp``), appending them to a queue file (with
  ``--issuer service``: from the daemon's signing service, below);
- an **edge** HTTP server on a free loopback port serving the published JWKS
  with the publisher's ``Cache-Control``: it reads the origin -- the JWKS file
  (like nginx), or the S3 object in moto (like a CDN, SigV4-signed) -- on every
  request, and while the origin does not answer (moto SIGSTOPped) serves the
  copy it last saw (refreshed every 50-100 ms), like ``stale-if-error``, for
  at most ``--stale-if-error`` seconds;
- **verifier processes** that know nothing of keymgr, fetch the JWKS over HTTP
  and cache it the way their library does: PyJWT ``PyJWKClient`` (lifespan +
  unknown-kid cooldown), jwcrypto ``JWKSet`` cached for the response's
  ``max-age`` (refreshed on an unknown kid after a cooldown), and Node ``jose``
  ``createRemoteJWKSet`` (cacheMaxAge + cooldownDuration). Every cache holds
  the JWKS up to ``--cache`` seconds even when a token names an unknown kid,
  and every verifier allows ``--skew`` seconds of clock skew (leeway /
  clockTolerance). Each token is verified when issued ("fresh") and again half
  a second before it expires ("late"), which needs its key to be still
  published.
- a **watcher** polling the origin, to time each key's publication and
  unpublication against its first and last use.

With ``--faults`` it also SIGKILLs the daemon at random times and restarts it
(``kill``), makes the JWKS publish target unwritable for a while (``block``:
the JWKS directory is moved aside and replaced by a file, then restored; root
ignores chmod; the static server keeps serving the document that was there, as
from a read-only disk), and for the cloud backends SIGSTOPs the moto / OpenBao
server for a few seconds (``pause``: ``MotoServer.outage`` /
``BaoServer.outage`` from tests/). After each fault it waits for the daemon to
recover and checks: exactly one active key, consistent states and timestamps
(``keymgr status --json``), no key recorded in state lost (still in state,
still in the backend unless destroyed), ``keymgr audit verify``, the served
JWKS matching state, and zero rejections.

``--issuer service`` (issue 19): the config gets a ``[service]`` table, its
Unix socket ``sign.sock`` in the workdir, the ring served to the soak's own
uid, and the issuer obtains every token with ``POST /v1/rings/{ring}/sign``
over that socket (stdlib ``http.client`` on an ``AF_UNIX`` socket, one
keep-alive connection) instead of ``KeyManager.sign`` in the soak's process.
Rate, ttl and skew are the same; the service cannot be given a clock (with
``ttl`` it stamps ``iat``/``exp`` from the daemon's), so the skew is applied
by the client: it sends its own ``iat`` (its skewed clock) and ``exp = iat +
T`` without ``ttl``, accepted because ``exp`` is at most T + S <= G away
(with ``--skew 0`` it sends ``"ttl": T``, the ordinary form). While the daemon
is SIGKILLed and restarted the socket refuses or is missing, and a 503
``not_ready`` may come: those are issuer errors (reported apart), never
rejections, like "no active key" through the API. The same verifiers verify
the tokens.

``--migrate RS256,ES256,EdDSA`` (issue 13): an algorithm migration during the
run. The ring starts with the first algorithm; each time the issuer first
uses the N-th, 2N-th, ... key (N = ``--migrate-every``, default 1), the
config's ``algorithm`` is rewritten to the next one of the list (cycling back
to the first after the last), checked with ``load_config``, and the daemon
gets SIGHUP (sent only once it logged ``daemon.started``, and never between a
fault's SIGKILL and restart; a restarted daemon reads the new config anyway);
its reload validates and applies it, so the next successor is generated with
the new algorithm while the active key goes on signing with its own. Every
verifier's allowlist holds all the listed algorithms (PyJWT
``algorithms=[...]``, jwcrypto ``JWT(algs=[...])``, jose ``algorithms``).
The report shows each change (the daemon's ``config.loaded``, the migration
warning of ``config check``), each key's algorithm against the schedule, the
tokens per algorithm and the checks each verifier accepted per algorithm, and
the sets of algorithms the JWKS held (two or three at once around a switch).
The run fails unless every listed algorithm signed tokens, each key's tokens
carry the algorithm state records for it, and no reload was rejected
(``config.rejected``), besides the usual checks. Tested with the file
backend, which supports every algorithm.

One more fault, never in the default set (``--fault-kinds edge-stale``, issue
20): the edge's origin fails, for the edge only (a CDN that cannot reach its
origin, while keymgr's publisher still writes and reads back the file / S3
object directly), from just before a successor is published until after the
successor is first used. The edge serves its last good copy -- the document
*before* the write -- and the successor is promoted A after its publication
at the origin: every verifier that refetches gets a JWKS without the new key.
keymgr cannot see that without edge probes, so today this run shows
rejections (and fails); it is the reproduction of issue 20.

Settings (seconds): ``--period`` P; ``--cache`` L, the longest JWKS cache
lifetime of any verifier (also the Cache-Control max-age); ``--skew`` S;
``--ttl`` T; ``--resolution`` R, an extra margin (default 0). By default
publish_ahead A = L + R and retire_grace G = T + S + R (+ 1 s with
``--cloud-state``: issuers on a shared store notice a promotion within 1 s):
the tightest settings the rules allow. keymgr records times in whole seconds,
rounding published_at and retired_at up, so R = 0 is safe (before that
rounding, a key could be promoted up to 1 s early: the soak found it).
``--misconfigure`` sets A shorter than the verifiers' cache lifetime and
must show rejections (the harness can fail).

Examples, from the repository root::

    .venv/bin/python -m benchmarks.soak                      # file backend, 10 rotations
    .venv/bin/python -m benchmarks.soak --faults --rotations 30
    .venv/bin/python -m benchmarks.soak --backend vault-transit --rotations 30 --faults
    .venv/bin/python -m benchmarks.soak --backend aws-kms --rotations 30 --faults
    .venv/bin/python -m benchmarks.soak --misconfigure      # must report rejections
    .venv/bin/python -m benchmarks.soak --faults --fault-kinds edge-stale  # issue 20
    .venv/bin/python -m benchmarks.soak --issuer service --rotations 10 --faults  # issue 19
    .venv/bin/python -m benchmarks.soak --migrate RS256,ES256,EdDSA --rotations 9 --faults

Exit code 0 when the run proves its point (no rejection and every check
passed; with ``--misconfigure``: rejections were seen), 1 otherwise, 2 for
bad usage or a missing tool. ``--json PATH`` writes the whole report.

Modules: ``settings`` (the knobs and what they resolve to), ``environments``
(file / aws-kms / vault-transit setups), ``home`` (the keymgr home: config and
CLI), ``daemon`` (the ``keymgr run`` process), ``edge`` (origins and the
caching edge server), ``watcher``, ``issuer`` (API or signing service),
``verifiers``, ``checks`` (the invariants), ``faults`` (the fault scheduler),
``migrate`` (``--migrate``), ``runner`` (wires them),
``report`` and ``render``; ``__main__`` is the CLI.
"""
