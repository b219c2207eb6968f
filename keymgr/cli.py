"""The ``keymgr`` command line.

Start-up cost matters (``--help`` < 150 ms): only argparse is imported here;
each command imports what it needs. Every error is one line on stderr, with
exit code 1 for a failed operation and 2 for bad usage or config.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, NoReturn

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


#: A key id: the RFC 7638 SHA-256 thumbprint, 43 base64url characters.
_KID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")

    def _parse_optional(self, arg_string: str) -> Any:
        # One kid in 64 starts with "-" (base64url): argparse would take
        # ``keymgr revoke -53xY...`` or ``--kid -53xY...`` for an unknown
        # option. No option of keymgr is 43 characters of the kid alphabet.
        if len(arg_string) == 43 and _KID_CHARS.issuperset(arg_string):
            return None
        return super()._parse_optional(arg_string)


def _time(text: str) -> Any:
    from keymgr.timefmt import parse_time

    try:
        return parse_time(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _duration(text: str) -> Any:
    from keymgr.timefmt import parse_duration

    try:
        return parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    common: Any = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help="config file (default: $KEYMGR_CONFIG, then ./keymgr.toml)",
    )
    p: argparse.ArgumentParser = _Parser(
        prog="keymgr", parents=[common], description="Graceful rollover of JWT signing keys."
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def cmd(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], help=help, description=help)

    s = cmd("init", "write a default config and a new master key (never overwrites)")
    s.add_argument("--dir", default=".", help="where to write them (default: .)")

    s = cmd("reconcile", "run one reconcile pass and print each transition applied")
    s.add_argument("--at", type=_time, metavar="TIME", help="RFC 3339 time replacing the clock")

    s = cmd("plan", "show what is due and when, changing nothing")
    s.add_argument("--at", type=_time, metavar="TIME", help="plan as of this RFC 3339 time")
    s.add_argument("--json", action="store_true")

    s = cmd("status", "every ring, every key, and the next transition")
    s.add_argument("--json", action="store_true")

    s = cmd("rotate", "start a rotation now (the successor still waits publish_ahead)")
    s.add_argument("ring")
    s.add_argument(
        "--emergency",
        action="store_true",
        help="promote as soon as published (verifiers may reject for up to A)",
    )
    s.add_argument("--at", type=_time, metavar="TIME", help=argparse.SUPPRESS)

    s = cmd("revoke", "revoke a key at once: unpublish and destroy it (compromise)")
    s.add_argument("kid")
    s.add_argument("--reason", help="recorded in state and in the audit log")
    s.add_argument("--at", type=_time, metavar="TIME", help=argparse.SUPPRESS)

    s = cmd(
        "adopt",
        "take over a keymgr key the backend holds but state does not record (audited)",
    )
    s.add_argument("ring")
    s.add_argument("kid", help="the key id (RFC 7638 thumbprint) the refusal named")
    s.add_argument(
        "--as",
        dest="as_state",
        required=True,
        choices=("active", "retired", "expired"),
        help="active: the ring's signer again (no active key yet); retired: published "
        "for retire_grace, then expired and destroyed; expired: destroyed after destroy_after",
    )
    s.add_argument("--at", type=_time, metavar="TIME", help=argparse.SUPPRESS)

    s = cmd("jwks", "print the JWKS document as published")
    s.add_argument("--ring", help="only this ring's keys")

    s = cmd("sign", "sign claims with the ring's active key (compact JWS)")
    s.add_argument("ring")
    s.add_argument("--claims", required=True, help="a JSON object")
    s.add_argument("--ttl", type=_duration, help="add iat and exp (e.g. 15m)")
    s.add_argument(
        "--at",
        type=_time,
        metavar="TIME",
        help="issue time for iat/exp instead of the clock (drills)",
    )

    s = cmd("audit", "verify or show the audit log")
    asub = s.add_subparsers(dest="audit_command", metavar="ACTION", parser_class=_Parser)
    asub.required = True
    a = asub.add_parser(
        "verify",
        parents=[common],
        help="check the hash chain, its anchor and the signed checkpoints",
    )
    a.add_argument(
        "--keys",
        metavar="FILE",
        help="a JWKS of the audit public keys you pinned ('keymgr audit keys'): every "
        "line must then be signed by one of them",
    )
    asub.add_parser(
        "keys",
        parents=[common],
        help="print the audit keys' public JWKS, read from the [audit] backend (to pin)",
    )
    a = asub.add_parser("show", parents=[common], help="print events")
    a.add_argument("--ring")
    a.add_argument("--kid")
    a.add_argument("--json", action="store_true")

    s = cmd("config", "configuration commands")
    csub = s.add_subparsers(dest="config_command", metavar="ACTION", parser_class=_Parser)
    csub.required = True
    csub.add_parser("check", parents=[common], help="validate the config, changing nothing")

    cmd("run", "run the daemon (scheduler, health and metrics endpoints)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command not in ("init", "config"):
        # May decrypt private keys: no core dump or same-user ptrace may expose them.
        from keymgr.hardening import no_core_dumps

        no_core_dumps()
    from keymgr.errors import KeymgrError

    try:
        return _dispatch(args)
    except KeymgrError as e:
        print(f"keymgr: error: {_one_line(str(e))}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_OK


def _one_line(text: str) -> str:
    """Errors are one line, even when a name in them holds a newline."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


def _manager(args: argparse.Namespace) -> Any:
    from keymgr.config import resolve_config_path
    from keymgr.logs import configure
    from keymgr.manager import KeyManager

    configure(cli=True)
    return KeyManager.from_config(resolve_config_path(getattr(args, "config", None)))


def _dispatch(args: argparse.Namespace) -> int:
    c = args.command
    if c == "init":
        from keymgr.init import init

        for line in init(args.dir):
            print(line)
        return EXIT_OK
    if c == "config":
        from keymgr.config import load_config, resolve_config_path

        cfg = load_config(resolve_config_path(getattr(args, "config", None)))
        _warn(cfg)
        _offline_checks(cfg)
        _state_checks(cfg)
        print(
            f"{cfg.path}: ok ({len(cfg.policies)} key ring(s), {len(cfg.backends)} "
            f"backend(s), {len(cfg.publishers)} publisher(s))"
        )
        return EXIT_OK
    if c == "run":
        from keymgr.config import load_config, resolve_config_path
        from keymgr.daemon import run

        cfg = load_config(resolve_config_path(getattr(args, "config", None)))
        _warn(cfg)
        return run(cfg)

    m = _manager(args)
    if c == "reconcile":
        return _print_pass(m.reconcile(args.at))
    if c == "rotate":
        return _print_pass(m.rotate(args.ring, emergency=args.emergency, now=args.at))
    if c == "revoke":
        return _print_pass(m.revoke(args.kid, reason=args.reason, now=args.at))
    if c == "adopt":
        return _print_pass(m.adopt(args.ring, args.kid, args.as_state, now=args.at))
    if c == "plan":
        doc = m.plan(args.at)
        if args.json:
            print(json.dumps(doc, indent=2))
        else:
            from keymgr.render import plan_text

            print(plan_text(doc))
        return EXIT_OK
    if c == "status":
        doc = m.status()
        if args.json:
            from keymgr.render import json_text

            print(json_text(doc))
        else:
            from keymgr.render import status_text

            print(status_text(doc, m.state()))
        return EXIT_OK
    if c == "jwks":
        print(json.dumps(m.jwks(args.ring), indent=2, sort_keys=True))
        return EXIT_OK
    if c == "sign":
        return _sign(m, args)
    if c == "audit":
        return _audit(m, args)
    raise AssertionError(c)


def _warn(cfg: Any) -> None:
    """Settings that load but may break the rollover promise: one stderr line each."""
    from keymgr.config import config_warnings

    for w in config_warnings(cfg):
        print(f"keymgr: warning: {_one_line(w)}", file=sys.stderr)


def _offline_checks(cfg: Any) -> None:
    """``config check`` only: a backend's cheap, offline look at the files it
    needs (``offline_check()``, e.g. the master key file's mode); an unsafe one
    is a ConfigError naming the config file, a missing one a warning."""
    from keymgr.errors import ConfigError

    for backend in cfg.backends.values():
        check = getattr(backend, "offline_check", None)
        if check is None:
            continue
        try:
            warnings = check()
        except ConfigError as e:
            raise ConfigError(f"{cfg.path}: {e}") from None
        for w in warnings:
            print(f"keymgr: warning: {cfg.path}: {_one_line(w)}", file=sys.stderr)


def _state_checks(cfg: Any) -> None:
    """``config check`` against a local state (a file store: no network): a
    ring removed while it has live keys, and a live key whose backend is gone
    (a moved ring keeps its old keys in the old backend until destroyed)."""
    if not cfg.daemon.state.startswith("file:"):
        return
    from keymgr.audit import AuditLog
    from keymgr.reconciler import Reconciler
    from keymgr.stores import open_store

    store = open_store(cfg.daemon.state)
    reconciler = Reconciler(cfg, store, AuditLog.for_config(cfg), "config-check")
    state = store.load()[0]
    reconciler.validate(state)
    reconciler.check_rings(state)


def _print_pass(res: Any) -> int:
    from keymgr.reconciler import describe

    for ev in res.events:
        print(describe(ev))
    for f in res.failures:
        print(f"keymgr: error: {_one_line(f)}", file=sys.stderr)
    return EXIT_OK if res.ok else EXIT_FAILED


def _sign(m: Any, args: argparse.Namespace) -> int:
    from keymgr.errors import UsageError

    try:
        claims = json.loads(args.claims)
    except json.JSONDecodeError as e:
        raise UsageError(f"--claims: not valid JSON ({e.msg} at position {e.pos})") from None
    if not isinstance(claims, dict):
        raise UsageError("--claims: must be a JSON object")
    print(m.sign(args.ring, claims, ttl=args.ttl, now=args.at))
    return EXIT_OK


def _audit(m: Any, args: argparse.Namespace) -> int:
    if args.audit_command == "verify":
        from keymgr.checkpoint import load_pinned

        pinned = load_pinned(args.keys) if args.keys else None
        with m.store.exclusive():  # not between a pass's commit and its append
            r = m.audit.check(
                m.state().audit, pinned=pinned, require_signed=m.config.audit is not None
            )
        print(
            f"{m.audit.path}: ok ({r.events} events, chain intact, "
            f"head anchored in state{_signed(r)})"
        )
        return EXIT_OK
    if args.audit_command == "keys":
        from keymgr.checkpoint import Checkpointer
        from keymgr.errors import UsageError

        if m.config.audit is None:
            raise UsageError(f"{m.config.path}: no [audit] table: the log has no audit key")
        cp = Checkpointer(m.config.audit, m.config.backends)
        print(json.dumps(cp.public_jwks(m.state().audit), indent=2, sort_keys=True))
        return EXIT_OK
    for ev in m.audit.events():
        if args.ring and ev.get("ring") != args.ring:
            continue
        if args.kid and ev.get("kid") != args.kid:
            continue
        if args.json:
            print(json.dumps(ev))
        else:
            from keymgr.reconciler import describe

            print(describe(ev))
    return EXIT_OK


def _signed(r: Any) -> str:
    """The checkpoint part of ``audit verify``'s summary."""
    if r.checkpoints == 0:
        return "" if not r.pinned else "; empty, nothing to prove"
    text = f"; {r.checkpoints} checkpoint(s) verified"
    if r.pinned:
        text += " against the pinned keys"
    if r.signed_through < r.events:
        return f"{text}; lines after {r.signed_through} unsigned ([audit] not configured)"
    return f"{text}; every line signed"


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
