"""``--migrate A1,A2,...``: the ring's algorithm changed during the run, as an operator does.

The ring starts with A1. Each time the issuer first uses the (j * N)-th key
(N = ``--migrate-every``), the next algorithm of the list (in a cycle) is
written into ``[keyrings.RING] algorithm`` (checked with ``load_config`` first,
the file replaced at once) and the daemon gets SIGHUP; its reload validates
and applies the config (docs/concepts.md, "Changing a ring's algorithm"). The
change lands just after a promotion, before the successor is generated
(P - A later), so the next key has the new algorithm; the active key goes on
signing with its own until it retires. A daemon SIGKILLed meanwhile reads the
new config when it starts again.

``keymgr config check`` is run after each change for its migration warning
(when the first new key is published and signs, when the last old one leaves
the JWKS); the report keeps it.
"""

from __future__ import annotations

import subprocess
import threading
import time
import traceback
from typing import Any

from .daemon import Daemon
from .home import Home
from .issuer import Issuer
from .logs import log
from .settings import Settings


class Migrator(threading.Thread):
    def __init__(
        self, s: Settings, t0: float, home: Home, daemon: Daemon, issuer: Issuer,
        failures: list[str],
    ) -> None:  # fmt: skip
        super().__init__(daemon=True)
        self.s, self.t0, self.home, self.issuer = s, t0, home, issuer
        #: Not "self.daemon": that is threading.Thread's daemonic flag.
        self.keymgr = daemon
        self.failures = failures
        self.stop_ev = threading.Event()
        #: One record per change: when, from, to, after how many keys, SIGHUP sent, warning.
        self.switches: list[dict[str, Any]] = []
        #: The algorithm the config names now.
        self.current = s.algorithms[0]

    def run(self) -> None:
        algs, every = self.s.migrate, self.s.migrate_every
        j = 1
        # The key after switch j is the (j * N + 1)-th: rotation j * N.
        while j * every <= self.s.rotations and not self.stop_ev.wait(0.05):
            if len(self.issuer.kids_used()) < j * every:
                continue
            nxt = algs[j % len(algs)]
            try:
                self.switch(nxt, keys=j * every)
            except Exception as e:
                self.failures.append(f"migrate to {nxt}: {type(e).__name__}: {e}")
                log(traceback.format_exc())
                return
            j += 1

    def switch(self, alg: str, keys: int) -> None:
        t = time.time()
        old, self.current = self.current, alg
        self.home.set_algorithm(alg)
        pos = self.keymgr.hup()
        rec: dict[str, Any] = {
            "at": round(t - self.t0, 2),
            "from": old,
            "to": alg,
            "after_keys": keys,
            "sighup": pos is not None,
        }
        if pos is None:
            self.failures.append(f"migrate to {alg}: the daemon was not running to get SIGHUP")
        else:
            # config.loaded; config.rejected is a failure (counted from the audit
            # log at the end); None: SIGKILLed before it reloaded, and it read
            # the new config when it started again.
            rec["reload"] = self.keymgr.reload_result(pos)
            rec["reloaded_in"] = round(time.time() - t, 2)
        check, tries = self.config_check()
        warning = [ln for ln in check.stderr.splitlines() if "algorithm: changing" in ln]
        rec["config_check"] = check.returncode
        rec["config_check_tries"] = tries
        rec["warning"] = warning[0].split("algorithm: ", 1)[1] if warning else None
        self.switches.append(rec)
        log(f"migrate: algorithm {old} -> {alg} after {keys} key(s) in use; "
            f"reload: {rec.get('reload')} in {rec.get('reloaded_in')}s")  # fmt: skip

    def config_check(self) -> tuple[subprocess.CompletedProcess[str], int]:
        """``keymgr config check``, again every 0.5 s while it fails, for up to 2 P.

        The check also checks the environment the config names: while the
        ``block`` fault has replaced the JWKS directory by a file it answers
        "publishers.site.path: ... exists and is not a directory" (exit 2), as it
        should, and prints no migration warning. An operator runs it again once
        the target is back; so does the soak. The fault lasts at most 1.2 P.
        """
        deadline = time.monotonic() + 2 * self.s.period
        tries = 1
        check = self.home.cli("config", "check")
        while check.returncode != 0 and time.monotonic() < deadline and not self.stop_ev.is_set():
            time.sleep(0.5)
            check = self.home.cli("config", "check")
            tries += 1
        return check, tries

    def stop(self) -> None:
        self.stop_ev.set()
        if self.is_alive():
            self.join(timeout=60)
