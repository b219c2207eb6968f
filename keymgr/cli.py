"""The ``keymgr`` command line.

Start-up cost matters (``--help`` < 150 ms): only argparse is imported here;
each command imports what it needs. Every error is one line on stderr, with
exit code 1 for a failed operation and 2 for bad usage or config.
"""

from __future__ import annotations

import argparse
import codecs
import json
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NoReturn

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


#: A key id: the RFC 7638 SHA-256 thumbprint, 43 base64url characters.
_KID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")

#: Options whose value is a kid.
_KID_OPTIONS = frozenset({"--kid"})


def _dash_kid(arg: str) -> bool:
    """A kid that argparse would take for an option: one kid in 64 begins with
    "-" (base64url). No option of keymgr is 43 characters of the kid alphabet."""
    return arg[:1] == "-" and len(arg) == 43 and _KID_CHARS.issuperset(arg)


def kid_safe_argv(argv: Sequence[str]) -> list[str]:
    """``argv`` with each kid that begins with "-" spelled so that argparse
    takes it as the argument it is, with argparse's own public syntax:
    ``--kid -53xY...`` becomes ``--kid=-53xY...``, and a positional kid
    (``revoke -53xY...``, ``adopt api -53xY...``) moves after a ``--``, at
    the end (in every command a kid is the last positional argument). What
    already follows a ``--`` is left alone, so the rewrite is idempotent and
    ``keymgr revoke -- -53xY...`` works as typed."""
    out: list[str] = []
    kids: list[str] = []
    for i, arg in enumerate(argv):
        if arg == "--":
            if kids:
                return [*out, "--", *kids, *argv[i + 1 :]]
            return [*out, *argv[i:]]
        if not _dash_kid(arg):
            out.append(arg)
        elif out and out[-1] in _KID_OPTIONS:
            out[-1] = f"{out[-1]}={arg}"
        else:
            kids.append(arg)
    return [*out, "--", *kids] if kids else out


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")

    def parse_known_args(
        self, args: Iterable[str] | None = None, namespace: Any = None
    ) -> tuple[Any, list[str]]:
        # Subcommand parsers get their part of the already rewritten argv:
        # the rewrite leaves it unchanged.
        return super().parse_known_args(
            kid_safe_argv(sys.argv[1:] if args is None else list(args)), namespace
        )


def _time(text: str) -> Any:
    from keymgr.timefmt import parse_time

    try:
        return parse_time(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _when(text: str) -> Any:
    from keymgr.auditquery import parse_when

    try:
        return parse_when(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return n


def _duration(text: str) -> Any:
    from keymgr.timefmt import parse_duration

    try:
        return parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


#: What the value of each kind of argument looks like, said once.
TIME_HELP = "an RFC 3339 time, e.g. 2026-01-31T12:00:00Z"
DURATION_HELP = "a duration: a number and s, m, h or d, e.g. 90s, 15m, 1h, 7d"
WHEN_HELP = "an RFC 3339 time, e.g. 2026-01-31T12:00:00Z, or a duration back from now, e.g. 7d"
KID_HELP = "a key id: the key's RFC 7638 thumbprint, 43 base64url characters (may begin with -)"
RING_HELP = "a key ring name, as in [keyrings.NAME] of the config"

EPILOG = """\
examples:
  keymgr init --dir /etc/keymgr           a config and a master key to start from
  keymgr config check                     validate before a deploy (offline)
  keymgr run                              the daemon
  keymgr status                           every ring, key and next transition
  keymgr plan --at 2026-03-01T00:00:00Z   what would happen by then

Exit codes: 0 ok, 1 an operation failed, 2 bad usage or config.
Every command reads --config PATH (default: $KEYMGR_CONFIG, then ./keymgr.toml).
Reference: docs/cli.md."""


def build_parser() -> argparse.ArgumentParser:
    common: Any = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help="config file (default: $KEYMGR_CONFIG, then ./keymgr.toml)",
    )
    raw = argparse.RawDescriptionHelpFormatter
    p: argparse.ArgumentParser = _Parser(
        prog="keymgr",
        parents=[common],
        description="Graceful rollover of JWT signing keys: generate, publish, promote, "
        "retire, destroy.",
        epilog=EPILOG,
        formatter_class=raw,
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def cmd(
        name: str, help: str, example: str, parent: Any = sub, more: str = ""
    ) -> argparse.ArgumentParser:
        """A subcommand whose --help gives its one-line description, its
        arguments with their formats, and an example."""
        lines = example.splitlines()
        examples = "\n".join(f"  {line}" for line in lines)
        heading = "examples" if len(lines) > 1 else "example"
        parser: argparse.ArgumentParser = parent.add_parser(
            name,
            parents=[common],
            help=help,
            description=help + (f"\n\n{more}" if more else ""),
            epilog=f"{heading}:\n{examples}",
            formatter_class=raw,
        )
        return parser

    def at_option(s: argparse.ArgumentParser, help: str | None) -> None:
        s.add_argument(
            "--at",
            type=_time,
            metavar="TIME",
            help=argparse.SUPPRESS if help is None else f"{help}: {TIME_HELP}",
        )

    s = cmd(
        "init",
        "write a default config and a new master key (never overwrites)",
        "keymgr init --dir /etc/keymgr",
    )
    s.add_argument("--dir", default=".", help="where to write them (default: .)")

    s = cmd(
        "reconcile",
        "run one reconcile pass and print each transition applied",
        "keymgr reconcile\nkeymgr reconcile --at 2026-03-01T00:00:00Z   # a drill",
    )
    at_option(s, "replace the clock (drills, tests; never earlier than the state's clock)")

    s = cmd(
        "plan",
        "show what is due and when, changing nothing",
        "keymgr plan\nkeymgr plan --at 2026-03-01T00:00:00Z --json",
        more="With --at: every transition of every ring from now until TIME, in order, "
        "projected on the optimistic path (every publish confirmed when due); keys not "
        "generated yet are shown as <next-N of RING>.",
    )
    at_option(s, "show the whole path from now until this time")
    s.add_argument("--json", action="store_true", help="machine-readable output")

    s = cmd(
        "status",
        "every ring, every key, and the next transition",
        "keymgr status --json\nkeymgr status --timeline timeline.svg\nkeymgr status --timeline -",
    )
    s.add_argument("--json", action="store_true", help="one ring per line, JSON")
    s.add_argument(
        "--direct",
        action="store_true",
        help="read the store in this process; without it, a running daemon with "
        "[service] that runs this config is asked (docs/signing-service.md#status)",
    )
    s.add_argument(
        "--timeline",
        metavar="FILE",
        help="draw each ring's keys as bars over time: an SVG picture written to FILE, "
        "or '-' for Unicode bars on the terminal (width $COLUMNS, else 80); "
        "the first 20 rings by name",
    )

    s = cmd(
        "rotate",
        "start a rotation now (the successor still waits publish_ahead)",
        "keymgr rotate api\nkeymgr rotate api --emergency   # compromise: the new key signs "
        "when this returns",
    )
    s.add_argument("ring", help=RING_HELP)
    s.add_argument(
        "--emergency",
        action="store_true",
        help="promote as soon as published: when the command returns the new key signs "
        "(caching verifiers may reject its tokens for up to publish_ahead)",
    )
    at_option(s, None)

    s = cmd(
        "revoke",
        "revoke a key at once: unpublish and destroy it; a revoked signer is replaced",
        "keymgr revoke 3Yx2bV0mFqO1yD4s8ZkP5rT7uW9aC6eG1hJ2kL3mN4o --reason 'leaked'",
    )
    s.add_argument("kid", help=KID_HELP)
    s.add_argument("--reason", help="free text, recorded in state and in the audit log")
    at_option(s, None)

    s = cmd(
        "adopt",
        "take over a keymgr key the backend holds but state does not record (audited)",
        "keymgr adopt api 3Yx2bV0mFqO1yD4s8ZkP5rT7uW9aC6eG1hJ2kL3mN4o --as active",
        more="Use it after a lost or replaced state, when a pass refuses with the kids "
        "the backend holds. See docs/threat-model.md.",
    )
    s.add_argument("ring", help=RING_HELP)
    s.add_argument("kid", help=KID_HELP)
    s.add_argument(
        "--as",
        dest="as_state",
        required=True,
        choices=("active", "retired", "expired"),
        help="active: the ring's signer again (no active key yet); retired: published "
        "for retire_grace, then expired and destroyed; expired: destroyed after destroy_after",
    )
    at_option(s, None)

    s = cmd("jwks", "print the JWKS document as published", "keymgr jwks --ring api")
    s.add_argument("--ring", help=f"only this ring's keys; {RING_HELP}")

    s = cmd(
        "sign",
        "sign claims with the ring's active key (compact JWS)",
        "keymgr sign api --claims '{\"sub\": \"alice\"}' --ttl 15m",
    )
    s.add_argument("ring", help=RING_HELP)
    s.add_argument("--claims", required=True, help="a JSON object, e.g. '{\"sub\": \"alice\"}'")
    s.add_argument("--ttl", type=_duration, help=f"add iat and exp: {DURATION_HELP}")
    s.add_argument(
        "--no-iss",
        dest="iss",
        action="store_false",
        help="do not add iss (by default the ring's issuer, when its publishers name one, "
        "is added to claims without iss)",
    )
    at_option(s, "issue time for iat/exp instead of the clock (drills)")

    s = cmd(
        "audit",
        "verify, show, follow, import or list the keys of the audit log",
        "keymgr audit verify\nkeymgr audit show --ring api --json\nkeymgr audit follow",
    )
    asub = s.add_subparsers(dest="audit_command", metavar="ACTION", parser_class=_Parser)
    asub.required = True
    a = cmd(
        "verify",
        "check the hash chain, its anchor and the signed checkpoints",
        "keymgr audit verify --keys audit-keys.json",
        parent=asub,
    )
    a.add_argument(
        "--keys",
        metavar="FILE",
        help="a JWKS of the audit public keys you pinned ('keymgr audit keys'): every "
        "line must then be signed by one of them",
    )
    cmd(
        "keys",
        "print the audit keys' public JWKS, read from the [audit] backend (to pin)",
        "keymgr audit keys > audit-keys.json",
        parent=asub,
    )
    a = cmd(
        "import",
        "copy a file audit log into the shared state store (once; verified first)",
        "keymgr audit import\nkeymgr audit import /var/lib/keymgr/audit.jsonl",
        parent=asub,
        more="With a shared state store the audit chain is kept in the store. A log kept "
        "in a file before is imported on the first start by itself; this command does it "
        "explicitly. The file must be the chain the state anchors (verified whole, with "
        "its checkpoints) before anything is written; events the store already holds with "
        "the same bytes are skipped, so it can be run again. See docs/audit.md#store.",
    )
    a.add_argument(
        "file", nargs="?", metavar="FILE", help="the file log (default: [daemon] audit_log)"
    )
    a = cmd(
        "show",
        "print audit events, oldest first, as a table (or JSON lines); does not verify",
        "keymgr audit show --since 7d --event 'key.*' --ring api\n"
        "keymgr audit show --reverse --limit 20 --json\n"
        "keymgr audit show --since 2026-01-01T00:00:00Z --until 2026-02-01T00:00:00Z "
        "--actor 'cli:*'",
        parent=asub,
        more="Filters combine (all must hold). The log is streamed, never loaded whole; "
        "--since/--until seek by time (bisection over the file), --reverse reads it from the "
        "end. 'show' does not verify the hash chain, its anchor or the checkpoints: "
        "'keymgr audit verify' does. See docs/audit.md#queries.",
    )
    a.add_argument(
        "--since", type=_when, metavar="WHEN", help=f"events at or after WHEN: {WHEN_HELP}"
    )
    a.add_argument(
        "--until", type=_when, metavar="WHEN", help=f"events at or before WHEN: {WHEN_HELP}"
    )
    a.add_argument(
        "--event",
        action="append",
        metavar="NAME",
        help="only events of this name or glob, e.g. key.revoked or 'key.*' (repeatable: any)",
    )
    a.add_argument("--actor", metavar="ACTOR", help="only this actor or glob: daemon, 'cli:*'")
    a.add_argument("--ring", help=f"only this ring's events; {RING_HELP}")
    a.add_argument("--kid", help=f"only this key's events; {KID_HELP}")
    a.add_argument("--limit", type=_count, metavar="N", help="at most N events (N >= 1)")
    a.add_argument("--reverse", action="store_true", help="newest first (read from the end)")
    a.add_argument(
        "--scan",
        action="store_true",
        help="read every line instead of seeking by time (for a log whose times go back "
        "by more than a day; see docs/audit.md#queries)",
    )
    a.add_argument("--json", action="store_true", help="JSON lines, as stored")
    a = cmd(
        "follow",
        "print audit events as they are appended, each verified first (like tail -F)",
        "keymgr audit follow --json\nkeymgr audit follow --from-start --syslog",
        parent=asub,
        more="Starts from a verified point: the head anchored in state (default), or the "
        "whole existing log verified first (--from-start). Every new line must chain, be "
        "anchored in state and, with [audit], be covered by a valid checkpoint before it is "
        "printed. Exits 1 at the first line that fails, naming it, and when the log is "
        "truncated or replaced without the lines already verified. See "
        "docs/audit.md#follow.",
    )
    a.add_argument(
        "--from-start",
        action="store_true",
        help="verify and print the existing log first (default: start at its end)",
    )
    a.add_argument("--json", action="store_true", help="JSON lines, as stored")
    a.add_argument(
        "--syslog",
        action="store_true",
        help="also send each verified event to journald (structured fields, "
        "SYSLOG_IDENTIFIER=keymgr-audit) when it runs, else to /dev/log",
    )
    a.add_argument(
        "--syslog-socket",
        metavar="PATH",
        help="send to this syslog datagram socket instead of /dev/log (implies --syslog)",
    )
    a.add_argument(
        "--journal-socket",
        metavar="PATH",
        help="send to this journald native socket (implies --syslog; default "
        "/run/systemd/journal/socket)",
    )
    a.add_argument("--interval", type=float, default=0.2, help=argparse.SUPPRESS)

    s = cmd("config", "configuration commands", "keymgr config check")
    csub = s.add_subparsers(dest="config_command", metavar="ACTION", parser_class=_Parser)
    csub.required = True
    cmd(
        "check",
        "validate the config offline, changing nothing: fields, referenced files "
        "(present, readable, safe modes), directories keymgr writes in",
        "keymgr --config /etc/keymgr/keymgr.toml config check",
        parent=csub,
    )

    cmd(
        "run",
        "run the daemon (scheduler, health and metrics endpoints)",
        "keymgr --config /etc/keymgr/keymgr.toml run",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command not in ("init", "config"):
        # May decrypt private keys: no core dump or same-user ptrace may expose them.
        from keymgr.hardening import no_core_dumps

        no_core_dumps()
    from keymgr.errors import KeymgrError
    from keymgr.model import gc_paused

    long_running = args.command == "run" or getattr(args, "audit_command", None) == "follow"
    try:
        if long_running:
            return _dispatch(args)
        # A one-shot command builds a large acyclic working set (a state of
        # 100,000 rings is millions of objects) and exits: the cyclic
        # collector would only walk it again and again, 3.7 s of the 17 s of
        # `status --json` at that size (benchmarks/bench_scale.py). Whatever
        # cycles the command leaves are freed at exit. As Mercurial's nogc.
        with gc_paused():
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


def _manager(args: argparse.Namespace, cfg: Any = None) -> Any:
    from keymgr.config import load_config, resolve_config_path
    from keymgr.logs import configure
    from keymgr.manager import KeyManager

    configure(cli=True)
    if cfg is None:
        cfg = load_config(resolve_config_path(getattr(args, "config", None)))
    return KeyManager(cfg)


def _daemon_hint(path: Path) -> tuple[Path, str] | None:
    """(socket, identity) of the config at ``path`` read from its bytes alone
    (keymgr.status_client.socket_hint), or None: no hint, or a config that
    cannot be read (load_config then says why, as always)."""
    from keymgr.config import config_identity
    from keymgr.fsutil import NotAFile, read_file
    from keymgr.status_client import socket_hint

    try:
        raw = read_file(path)
    except (OSError, NotAFile):
        return None
    sock = socket_hint(raw, path)
    return None if sock is None else (sock, config_identity(path, raw))


def _status_from_daemon(json_form: bool, socket_path: Path, identity: str) -> bool:
    """``status [--json]`` from the daemon on ``socket_path`` (keymgr.status_client),
    copied to stdout as it comes: the JSON, or the text the daemon draws from it."""
    from keymgr.status_client import from_daemon

    def warn(line: str) -> None:
        print(f"keymgr: warning: {_one_line(line)}", file=sys.stderr)

    out = sys.stdout
    out.flush()
    write: Any
    raw = getattr(out, "buffer", None)  # None: a text stream (keymgr.cli.main in-process)
    if raw is not None:
        write = raw.write
    else:
        text = codecs.getincrementaldecoder("utf-8")()

        def write(chunk: bytes) -> None:
            out.write(text.decode(chunk))

    return from_daemon(socket_path, identity, write, warn, "json" if json_form else "text")


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
        from keymgr.config import cache_control_notes

        for note in cache_control_notes(cfg):
            print(f"keymgr: info: {_one_line(note)}")
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

    if c == "audit" and args.audit_command == "show":
        return _audit_show(args)  # reads one file: the config, not a KeyManager
    loaded = None
    if c == "status" and args.timeline is None and not args.direct:
        from keymgr.config import load_config, resolve_config_path

        path = resolve_config_path(getattr(args, "config", None))
        # The daemon is asked before the config is parsed (keymgr.status_client).
        hint = _daemon_hint(path)
        if hint is not None and _status_from_daemon(args.json, *hint):
            return EXIT_OK
        loaded = load_config(path)
        svc = loaded.service
        if (
            svc is not None
            and (hint is None or svc.listeners.socket != hint[0])
            and _status_from_daemon(args.json, svc.listeners.socket, loaded.identity)
        ):
            return EXIT_OK
    m = _manager(args, loaded)
    if c == "reconcile":
        return _print_pass(m.reconcile(args.at))
    if c == "rotate":
        return _print_pass(m.rotate(args.ring, emergency=args.emergency, now=args.at))
    if c == "revoke":
        return _print_pass(m.revoke(args.kid, reason=args.reason, now=args.at))
    if c == "adopt":
        return _print_pass(m.adopt(args.ring, args.kid, args.as_state, now=args.at))
    if c == "plan":
        if args.at is not None:
            return _plan_path(m, args.at, args.json)
        doc = m.plan(args.at)
        if args.json:
            print(json.dumps(doc, indent=2))
        else:
            from keymgr.render import plan_text

            print(plan_text(doc))
        _migration_warnings(m)
        return EXIT_OK
    if c == "status":
        if args.timeline is not None:
            return _timeline(m, args.timeline)
        if args.json:
            from keymgr.render import write_sections

            write_sections(m.status_parts(), sys.stdout.write)
            return EXIT_OK
        from keymgr.render import write_status_text

        write_status_text(m.status_parts(), sys.stdout.write)
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
    """``config check`` only, offline: what ``nginx -t`` or ``sshd -t`` would
    catch before a deploy. Each backend's own look at the files it needs
    (``Backend.offline_check``: the master key file exists, is readable, is not
    exposed), and every directory keymgr writes in (state, audit log, file
    publishers) exists or can be created. A problem is a ConfigError naming the
    config file, the field and the path; a warning is one line on stderr."""
    from keymgr.errors import ConfigError
    from keymgr.fsutil import dir_problem

    dirs: list[tuple[str, Path]] = [("daemon.audit_log", cfg.daemon.audit_log.parent)]
    if (
        not cfg.daemon.state.startswith("file:")
        and cfg.daemon.audit != "file"
        and not cfg.daemon.audit_log_set
    ):
        dirs = []  # the audit chain lives in the shared store, no mirror is written
    if cfg.daemon.state.startswith("file:"):
        from keymgr.stores import file_state_path

        dirs.append(("daemon.state", file_state_path(cfg.daemon.state).parent))
    for name, pub in cfg.publishers.items():
        for option, path in pub.paths().items():
            dirs.append((f"publishers.{name}.{option}", path.parent))
    for field, path in dirs:
        problem = dir_problem(path)
        if problem is not None:
            raise ConfigError(f"{cfg.path}: {field}: {path}: {problem}")
    for backend in cfg.backends.values():
        try:
            warnings = backend.offline_check()
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
    from keymgr.reconciler import Reconciler, pass_time
    from keymgr.stores import open_store

    store = open_store(cfg.daemon.state)
    reconciler = Reconciler(cfg, store, AuditLog.for_config(cfg), "config-check")
    state = store.load()[0]
    reconciler.validate(state)
    reconciler.check_rings(state)
    from keymgr.projection import migration_warnings
    from keymgr.timefmt import utcnow

    now = pass_time(utcnow, state)
    for w in migration_warnings(state, cfg.policies, now, cfg.publishers, cfg.edge_urls()):
        print(f"keymgr: warning: {cfg.path}: {_one_line(w)}", file=sys.stderr)


def _plan_path(m: Any, at: Any, as_json: bool) -> int:
    """``plan --at T``: every transition of every ring from now to T, projected
    (keymgr.projection) on the optimistic path; nothing is written anywhere."""
    from keymgr.projection import ASSUMPTION, migration_warning, migrations, project
    from keymgr.timefmt import format_time

    state = m.shown_state()
    now = m._clock(None, state)
    until = m._clock(at, state)  # refuses a T before the newest time in state
    start = min(now, until)
    state = m.reconciler.observe(state)
    policies, publishers, edges = m.config.policies, m.config.publishers, m.config.edge_urls()
    proj = project(state, policies, start, until, publishers, edges)
    migs = migrations(state, policies, start, publishers, edges)
    doc: dict[str, Any] = {
        "from": format_time(start),
        "at": format_time(until),
        "assumes": ASSUMPTION,
        "path": [s.to_dict() for s in proj.steps],
        "upcoming": {
            ring: None
            if u is None
            else {"action": u.action, "kid": u.kid, "at": format_time(u.at)}
            for ring, u in proj.upcoming.items()
        },
        "migrations": [mg.to_dict() for mg in migs],
    }
    print(json.dumps(doc, indent=2) if as_json else _path_text(doc))
    for mg in migs:
        print(f"keymgr: warning: {_one_line(migration_warning(mg, start))}", file=sys.stderr)
    return EXIT_OK


def _path_text(doc: dict[str, Any]) -> str:
    """``plan --at T`` for people: one row per transition, then what follows T."""
    path = doc["path"]
    out = [
        f"path from {doc['from']} to {doc['at']}: {len(path)} transition(s)",
        f"assumes the {doc['assumes']}",
    ]
    if path:
        cols = ("at", "ring", "action", "kid", "alg", "reason")
        rows = [[str(s[c] or "") for c in cols] for s in path]
        heads = ["TIME", "RING", "ACTION", "KID", "ALG", "REASON"]
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(heads)]
        for r in [heads, *rows]:
            out.append("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
    else:
        out.append("nothing happens until then")
    out.append(f"after {doc['at']}:")
    for ring, u in doc["upcoming"].items():
        if u is None:
            out.append(f"  {ring}: nothing scheduled")
        else:
            kid = f" {u['kid']}" if u.get("kid") else ""
            out.append(f"  {ring}: {u['action']}{kid} at {u['at']}")
    for mg in doc["migrations"]:
        out.append(
            f"algorithm change of {mg['ring']}: {' and '.join(mg['from'])} -> {mg['to']}: "
            f"first {mg['to']} key published {mg['published_at'] or '-'}, signs from "
            f"{mg['active_at'] or '-'}; last {' and '.join(mg['from'])} key leaves the JWKS "
            f"{mg['old_unpublished_at'] or '-'}"
        )
    return "\n".join(out)


def _migration_warnings(m: Any) -> None:
    """``plan``: one stderr line per ring whose algorithm is changing."""
    from keymgr.projection import migrating, migration_warnings

    state = m.state()
    if not migrating(state, m.config.policies):
        return
    now = m._clock(None, state)
    state = m.reconciler.observe(state)
    cfg = m.config
    for w in migration_warnings(state, cfg.policies, now, cfg.publishers, cfg.edge_urls()):
        print(f"keymgr: warning: {_one_line(w)}", file=sys.stderr)


def _print_pass(res: Any) -> int:
    from keymgr.reconciler import describe

    for ev in res.events:
        print(describe(ev))
    for f in res.failures:
        print(f"keymgr: error: {_one_line(f)}", file=sys.stderr)
    return EXIT_OK if res.ok else EXIT_FAILED


def _timeline(m: Any, target: str) -> int:
    """``status --timeline FILE|-``: the SVG to FILE, or the terminal form."""
    if target == "-":
        try:
            width = int(os.environ.get("COLUMNS", ""))
        except ValueError:
            width = 80
        print(m.timeline_text(width=width if width > 0 else 80))
        return EXIT_OK
    from keymgr.errors import UsageError

    data = m.timeline_svg().encode()
    path = Path(target)
    try:
        path.write_bytes(data)
    except OSError as e:
        raise UsageError(f"--timeline {target}: cannot write: {e.strerror}") from None
    print(f"{target}: timeline written ({len(data)} bytes)")
    return EXIT_OK


def _sign(m: Any, args: argparse.Namespace) -> int:
    from keymgr.errors import UsageError

    try:
        claims = json.loads(args.claims)
    except json.JSONDecodeError as e:
        raise UsageError(f"--claims: not valid JSON ({e.msg} at position {e.pos})") from None
    if not isinstance(claims, dict):
        raise UsageError("--claims: must be a JSON object")
    print(m.sign(args.ring, claims, ttl=args.ttl, now=args.at, issuer=args.iss))
    return EXIT_OK


def _audit(m: Any, args: argparse.Namespace) -> int:
    if args.audit_command == "verify":
        from keymgr.checkpoint import load_pinned

        pinned = load_pinned(args.keys) if args.keys else None
        if m.audit.in_store:
            from keymgr.auditstore import verify_store

            r = verify_store(m, pinned)
        else:
            with m.store.exclusive():  # not between a pass's commit and its append
                r = m.audit.check(
                    m.state().audit, pinned=pinned, require_signed=m.config.audit is not None
                )
        label = m.audit.medium.adapter.describe("audit") if m.audit.in_store else m.audit.path
        print(
            f"{label}: ok ({r.events} events, chain intact, "
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
    if args.audit_command == "import":
        return _audit_import(m, args)
    assert args.audit_command == "follow", args.audit_command
    return _audit_follow(m, args)


def _audit_import(m: Any, args: argparse.Namespace) -> int:
    """``audit import [FILE]``: the file log into the store, verified, then audited."""
    from keymgr.auditstore import import_file
    from keymgr.timefmt import utcnow

    path = Path(args.file) if args.file else m.audit.path
    with m.store.exclusive():  # no pass between the anchor read and the copy
        state = m.store.load()[0]
        m.reconciler.validate(state)
        n = import_file(m.audit, state, path)
        m.reconciler.record(
            [{"ts": utcnow(), "event": "audit.imported", "reason": f"{n} events from {path}"}]
        )
    print(f"{path}: {n} events imported into {m.audit.where}, verified against the anchor")
    return EXIT_OK


def _stdout_writer() -> tuple[Any, Any]:
    """(write bytes, flush) on stdout, raw when it has a buffer."""
    buf = getattr(sys.stdout, "buffer", None)
    if buf is not None:
        sys.stdout.flush()
        return buf.write, buf.flush
    return (lambda b: sys.stdout.write(b.decode())), sys.stdout.flush


def _quiet_stdout() -> None:
    """stdout closed by its reader (``| head``): no more output, no noise at exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _audit_show(args: argparse.Namespace) -> int:
    """``audit show``: stream the events a query selects (keymgr.auditquery); no verification."""
    from keymgr.auditquery import Query, Table, query
    from keymgr.config import load_config, resolve_config_path
    from keymgr.errors import UsageError

    if args.since is not None and args.until is not None and args.since > args.until:
        raise UsageError("--since is after --until: nothing can match")
    q = Query(
        since=args.since,
        until=args.until,
        events=tuple(args.event or ()),
        actor=args.actor,
        ring=args.ring,
        kid=args.kid,
        limit=args.limit,
        reverse=args.reverse,
        scan=args.scan,
    )
    cfg = load_config(resolve_config_path(getattr(args, "config", None)))
    path = cfg.daemon.audit_log
    hits = _store_hits(cfg, q)
    write, flush = _stdout_writer()

    def warn(text: str) -> None:
        print(f"keymgr: warning: {_one_line(text)}", file=sys.stderr)

    try:
        found = hits(warn) if hits is not None else query(path, q, warn)
        if args.json:
            for hit in found:
                write(hit.raw + b"\n")
        else:
            table = Table(lambda text: write(text.encode()))
            for hit in found:
                table.add(hit.event)
            table.close()
        flush()
    except BrokenPipeError:
        _quiet_stdout()
    return EXIT_OK


def _store_hits(cfg: Any, q: Any) -> Any:
    """With the audit record in the shared state store: a function of ``warn``
    giving the hits (keymgr.auditstore.query_store); None for the file log."""
    if cfg.daemon.state.startswith("file:") or cfg.daemon.audit == "file":
        return None
    from keymgr.audit import AuditLog
    from keymgr.auditstore import StoreMedium, query_store
    from keymgr.stores import open_store

    store = open_store(cfg.daemon.state)
    medium = AuditLog.for_config(cfg, store).medium
    if not isinstance(medium, StoreMedium):
        return None
    return lambda warn: query_store(medium, store.load()[0].audit.seq, q, warn)


def _audit_follow(m: Any, args: argparse.Namespace) -> int:
    """``audit follow``: verified events as they arrive, until stopped or a check fails."""
    from keymgr.auditquery import FOLLOW_WIDTHS, Follower, SyslogSink, Table, exit_on_sigterm

    sinks = []
    if args.syslog_socket:
        sinks.append(SyslogSink(args.syslog_socket, journal=False))
    if args.journal_socket:
        sinks.append(SyslogSink(args.journal_socket, journal=True))
    if args.syslog and not sinks:
        sinks.append(SyslogSink.local())
    write, flush = _stdout_writer()
    table = None if args.json else Table(lambda t: write(t.encode()), widths=FOLLOW_WIDTHS)

    def emit(ev: dict[str, Any], raw: bytes) -> None:
        if table is None:
            write(raw + b"\n")
        else:
            table.add(ev)
        flush()
        for sink in sinks:
            sink.send(ev, raw)

    def note(text: str) -> None:
        print(f"keymgr: {_one_line(text)}", file=sys.stderr, flush=True)

    exit_on_sigterm()
    try:
        if m.audit.in_store:
            from keymgr.auditstore import StoreFollower

            StoreFollower(
                m, from_start=args.from_start, emit=emit, note=note, interval=args.interval
            ).run()
        else:
            Follower(
                m, from_start=args.from_start, emit=emit, note=note, interval=args.interval
            ).run()
    except BrokenPipeError:
        _quiet_stdout()
    finally:
        for sink in sinks:
            sink.close()
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
