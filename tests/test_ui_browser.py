"""The read-only operator page (``[daemon] ui``), in a real browser.

A real ``keymgr run`` daemon serves the page for three rings mid-rotation (the
history is driven with ``reconcile --at`` in the past, then the daemon carries
on with the wall clock: it promotes one ring's successor as it starts).
Headless Chromium from Debian, driven by Selenium through the system
chromedriver (``/usr/bin/chromedriver``: nothing is downloaded), loads the
page and the test checks what it shows, that the browser fetched nothing but
the page itself (Chrome's performance log: CDP Network events), that the
Content-Security-Policy holds (the page's own style applies by its hash, an
injected inline script does not run and is reported as a violation), and
saves a screenshot (``$KEYMGR_TEST_ARTIFACTS``, else the test's tmp dir).

The other tests need no browser: the config option, the route and its
headers on the bounded listener, the page off by default (404), the chain
check on a consistent prefix, and no path or secret of the config in the page.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import urllib.request
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from keymgr import ui
from keymgr.config import load_config
from keymgr.errors import ConfigError
from keymgr.health import HealthServer
from keymgr.manager import KeyManager
from keymgr.metrics import Metrics
from keymgr.timefmt import format_time, utcnow
from tests.conftest import Home
from tests.test_daemon import Launcher, audit_events, fast_home, get, wait_for

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

CONFIG = """\
[daemon]
state = "file:state.json"
audit_log = "audit.jsonl"
reconcile_interval = "1s"
listen = "127.0.0.1:0"
lease_ttl = "30s"
{ui}

[backends.local]
type = "file"
path = "keys"
master_key_file = "master.key"

[publishers.site]
type = "file"
path = "public/.well-known/jwks.json"

[keyrings.api]
backend = "local"
algorithm = "ES256"
rotation_period = "1h"
publish_ahead = "20m"
retire_grace = "30m"
destroy_after = "10m"
publishers = ["site"]

[keyrings.web]
backend = "local"
algorithm = "EdDSA"
rotation_period = "30m"
publish_ahead = "5m"
retire_grace = "1h"
destroy_after = "1h"
publishers = ["site"]

[keyrings.batch]
backend = "local"
algorithm = "RS256"
rotation_period = "2h"
publish_ahead = "10m"
retire_grace = "10m"
destroy_after = "10m"
publishers = ["site"]
"""


def ts(t: datetime) -> str:
    s = format_time(t)
    assert s is not None
    return s


def mid_rotation(home: Home, ui_line: str = "ui = true") -> datetime:
    """Three rings, driven in the past so that at the wall clock now:
    api has its successor published and waiting publish_ahead (promotion in
    about 6 minutes); web's successor is due for promotion (the daemon does it
    as it starts); batch has one signer, its successor due in 55 minutes."""
    home.config.write_text(CONFIG.format(ui=ui_line))
    now0 = utcnow()
    home.run("reconcile", "--at", ts(now0 - timedelta(minutes=55)), check=True, inproc=True)
    home.run("reconcile", "--at", ts(now0 - timedelta(minutes=14)), check=True, inproc=True)
    return now0


def fetch(port: int, path: str = "/ui") -> tuple[int, dict[str, str], str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read().decode()


def secrets_of(home: Home) -> list[str]:
    """Every path and secret of the home that must never reach the page."""
    d = home.dir
    out = [str(d), str(d.resolve()), (d / "master.key").read_text().strip()]
    out += ["master.key", "jwks.json", ".well-known", "state.json", "audit.jsonl", "/tmp/"]
    return out


# --------------------------------------------------------------------------- no browser


def test_config_ui_option(home: Home) -> None:
    def with_ui(line: str) -> Any:
        text = home.config.read_text().replace("[daemon]\n", f"[daemon]\n{line}\n", 1)
        cfg_path = home.dir / "ui.toml"
        cfg_path.write_text(text)
        return load_config(cfg_path).daemon.ui

    assert load_config(home.config).daemon.ui is None  # off unless enabled
    assert with_ui("ui = false") is None
    assert with_ui("ui = true") == "/ui"
    assert with_ui('ui = "/ops/keys"') == "/ops/keys"
    for bad in ('ui = "ops"', 'ui = "/metrics"', "ui = 1", 'ui = "/a b"', 'ui = "/<x>"'):
        with pytest.raises(ConfigError, match=r"daemon\.ui"):
            with_ui(bad)


def test_route_headers_and_failures_on_the_bounded_listener() -> None:
    pages = {"/ops": (b"<!doctype html><p>hi</p>", ui.HEADERS)}

    def route(path: str) -> tuple[bytes, Any] | None:
        if path == "/boom":
            raise RuntimeError("/etc/secret/path exploded")
        return pages.get(path)

    s = HealthServer("127.0.0.1", 0, Metrics(), lambda: (True, {}), lambda: (True, {}),
                     ui=route)
    try:
        code, headers, body = fetch(s.port, "/ops?x=1")
        assert code == 200 and body == "<!doctype html><p>hi</p>"
        assert headers["content-type"] == "text/html; charset=utf-8"
        assert headers["content-security-policy"] == ui.CSP
        assert headers["cache-control"] == "no-store"
        assert headers["x-content-type-options"] == "nosniff"
        assert fetch(s.port, "/ui")[0] == 404
        code, headers, body = fetch(s.port, "/boom")
        assert code == 500 and "secret" not in body and "Traceback" not in body
        assert fetch(s.port, "/healthz")[0] == 200
    finally:
        s.close()
    csp = dict(part.strip().split(" ", 1) for part in ui.CSP.split(";"))
    assert csp["default-src"] == "'none'"
    assert csp["style-src"].startswith("'sha256-") and "unsafe" not in ui.CSP
    assert "script-src" not in csp and csp["img-src"] == "data:"


def test_ui_off_by_default_is_404(home: Home, launcher: Launcher) -> None:
    fast_home(home)
    d = launcher.start(home)
    d.ready()
    assert fetch(d.port, "/ui")[0] == 404
    assert get(d.port, "/healthz")[0] == 200
    rc, _ = d.stop()
    assert rc == 0


def test_tail_events_and_redaction(tmp_path: Path, home: Home) -> None:
    log = tmp_path / "a.jsonl"
    log.write_bytes(b"".join(json.dumps({"seq": i, "event": "x"}).encode() + b"\n"
                             for i in range(1, 101)) + b'{"seq": 101, "ev')
    got = ui.tail_events(log, 5)
    assert [e["seq"] for e in got] == [96, 97, 98, 99, 100]  # the torn line is left out
    assert ui.tail_events(tmp_path / "missing", 5) == []
    assert len(ui.tail_events(log, 1000, limit=300)) < 20  # bounded by bytes read
    redact = ui.Redactor(load_config(home.config))
    text = f"{home.config}: bad TOML; also /var/lib/keymgr/x.json and C:\\keys\\k.pem"
    assert redact(text) == "[path]: bad TOML; also [path] and [path]"
    assert redact("replica vm:123:abc, reason=scheduled, 1/2") == (
        "replica vm:123:abc, reason=scheduled, 1/2"
    )
    assert redact("publishers.cdn: s3://bucket/jwks.json: denied (https://vault:8200/v1)") == (
        "publishers.cdn: [url]: denied ([url])"
    )


def test_chain_check_is_the_audit_verify_of_a_consistent_prefix(home: Home) -> None:
    home.run("reconcile", check=True, inproc=True)
    m = KeyManager.from_config(home.config)
    view = ui.OperatorView()
    redact = ui.Redactor(m.config)
    assert view.verify_due()
    r = view.verify(m, redact)
    lines = len((home.dir / "audit.jsonl").read_text().splitlines())
    assert r is not None and r.ok and r.events == lines > 0 and view.chain == r
    assert not view.verify_due()  # cached: the next one waits VERIFY_MIN_GAP at least
    # Edit a line: the check fails, in one line, without the log's path.
    path = home.dir / "audit.jsonl"
    text = path.read_text().replace('"bootstrap"', '"scheduled"', 1)
    path.write_text(text)
    bad = view.verify(m, redact)
    assert bad is not None and not bad.ok
    assert bad.error is not None and "hash mismatch" in bad.error
    assert str(home.dir) not in bad.error and "[path]" in bad.error


def test_page_shows_no_path_or_secret(home: Home, launcher: Launcher) -> None:
    mid_rotation(home)
    d = launcher.start(home)
    d.ready()
    # A rejected reload records the config's path in the audit log: redacted here.
    good = home.config.read_text()
    home.config.write_text(good + "\n[keyrings.broken\n")
    d.popen.send_signal(signal.SIGHUP)
    wait_for(lambda: any(e["event"] == "config.rejected" for e in audit_events(home)), 15,
             "config.rejected in the audit log")
    home.config.write_text(good)
    assert str(home.config) in json.dumps(audit_events(home))
    html = wait_for(lambda: (p := fetch(d.port)[2]) and "config.rejected" in p and p, 15,
                    "the page to list config.rejected")
    for s in secrets_of(home):
        assert s not in html, s
    assert "[path]: bad TOML" in html
    rc, _ = d.stop()
    assert rc == 0


# --------------------------------------------------------------------------- the browser


def _browser_missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium)"
    for exe in (CHROMIUM, CHROMEDRIVER):
        if not os.access(exe, os.X_OK):
            return f"{exe} missing (apt-get install chromium chromium-driver)"
    return None


@pytest.fixture
def browser() -> Iterator[Any]:
    missing = _browser_missing()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"CI must install the browser: {missing}")
        pytest.skip(missing)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--window-size=1280,1600", "--no-first-run", "--disable-extensions",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-default-apps", "--metrics-recording-only", "--no-default-browser-check",
    ):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _network(driver: Any) -> list[dict[str, Any]]:
    out = []
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg["method"].startswith("Network."):
            out.append(msg)
    return out


def test_operator_page_in_a_real_browser(
    home: Home, launcher: Launcher, browser: Any, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    mid_rotation(home)
    d = launcher.start(home)
    d.ready()
    url = f"http://127.0.0.1:{d.port}/ui"
    # The daemon's first pass promoted web's successor; wait until the page
    # shows it and a chain verification that covers the history.
    wait_for(lambda: (p := fetch(d.port)[2]) and 'data-ok="true"' in p
             and "key.promoted" in p and p.count('data-state="retired"') >= 1, 20,
             "the page to show web's promotion and a verified chain")
    state = home.state()["rings"]
    kids = {r: {k["state"]: k["kid"] for k in state[r]["keys"]} for r in state}

    browser.get_log("performance")  # drop anything before the page load
    browser.get(url)
    assert browser.title == "keymgr operator view"

    # -- what it shows ----------------------------------------------------------
    tables = {t.get_attribute("data-ring"): t
              for t in browser.find_elements(By.CSS_SELECTOR, "table.ring")}
    assert sorted(tables) == ["api", "batch", "web"]

    def rows(ring: str) -> dict[str, str]:
        return {r.get_attribute("data-kid"): r.get_attribute("data-state")
                for r in tables[ring].find_elements(By.CSS_SELECTOR, "tr.key")}

    assert rows("api") == {kids["api"]["active"]: "active",
                           kids["api"]["published"]: "published"}
    assert rows("web") == {kids["web"]["retired"]: "retired", kids["web"]["active"]: "active"}
    assert rows("batch") == {kids["batch"]["active"]: "active"}
    # Visible text too, not only attributes.
    assert "published" in tables["api"].text and kids["api"]["published"] in tables["api"].text
    assert "rotation every 1h, published 20m ahead" in tables["api"].text

    def nexts(ring: str) -> list[str]:
        return [p.text for p in browser.find_elements(
            By.CSS_SELECTOR, f'p.next[data-ring="{ring}"]')]

    def minutes(text: str) -> int:
        m = re.search(r"\(in (\d+)m", text)
        assert m, text
        return int(m.group(1))

    api_next = nexts("api")
    assert len(api_next) == 1 and api_next[0].startswith(
        f"next: promote {kids['api']['published']} at ")
    assert 1 <= minutes(api_next[0]) <= 6, api_next  # t2 + publish_ahead
    assert nexts("web")[0].startswith("next: generate at ")
    assert 15 <= minutes(nexts("web")[0]) <= 25  # promoted now, + P - A
    assert nexts("batch")[0].startswith("next: generate at ")
    assert 45 <= minutes(nexts("batch")[0]) <= 55  # t1 + P - A

    ready = browser.find_element(By.ID, "ready").text
    assert ready == "ready"

    chain = browser.find_element(By.ID, "chain")
    assert chain.get_attribute("data-ok") == "true"
    assert chain.text.startswith("chain verified: ")
    verified = int(chain.text.split("chain verified: ")[1].split(" ")[0])
    assert verified >= 15  # the history driven before the daemon started
    events = [r.get_attribute("data-event")
              for r in browser.find_elements(By.CSS_SELECTOR, "#events tr.event")]
    assert "daemon.started" in events and "key.promoted" in events
    promoted = [r.text for r in browser.find_elements(By.CSS_SELECTOR, "#events tr.event")
                if r.get_attribute("data-event") == "key.promoted" and " web " in f" {r.text} "]
    assert promoted and "daemon" in promoted[0]

    svg = browser.find_element(By.CSS_SELECTOR, "#timeline svg.keymgr-timeline")
    assert svg.get_attribute("role") == "img"
    svg_rings = [g.get_attribute("data-ring")
                 for g in svg.find_elements(By.CSS_SELECTOR, "g.ring")]
    assert svg_rings == ["api", "batch", "web"]
    assert svg.find_elements(By.CSS_SELECTOR, "g.now")
    assert svg.find_elements(By.CSS_SELECTOR, "g.window-publish-ahead")
    retired = kids["web"]["retired"]
    assert svg.find_elements(By.CSS_SELECTOR, f'g.window-grace[data-kid="{retired}"]')
    fills = {r.get_attribute("data-state"): r.get_attribute("fill")
             for r in svg.find_elements(By.CSS_SELECTOR, "rect.seg")}
    assert {"active", "published", "retired"} <= set(fills)

    # -- nothing but the page was fetched ----------------------------------------
    net = _network(browser)
    requested = [m["params"]["request"]["url"] for m in net
                 if m["method"] == "Network.requestWillBeSent"]
    assert [u for u in requested if not u.startswith("data:")] == [url], requested
    answers = [m["params"]["response"] for m in net if m["method"] == "Network.responseReceived"
               and m["params"]["response"]["url"] == url]
    assert answers and answers[0]["status"] == 200
    headers = {k.lower(): v for k, v in answers[0]["headers"].items()}
    csp = headers["content-security-policy"]
    assert csp == ui.CSP
    assert "default-src 'none'" in csp and "unsafe" not in csp and "script-src" not in csp

    # -- the CSP holds --------------------------------------------------------------
    assert browser.execute_script("return document.querySelectorAll('script').length") == 0
    # The page's own inline style applies (allowed by its hash) ...
    bg = browser.execute_script(
        "return getComputedStyle(document.querySelector('header')).backgroundColor")
    assert bg == "rgb(31, 41, 51)"
    console = browser.get_log("browser")
    assert not [e for e in console if "Content Security Policy" in e["message"]], console
    # ... and an inline script injected into it does not run, and is reported.
    browser.execute_script(
        "window.__violations = [];"
        "document.addEventListener('securitypolicyviolation',"
        "  e => window.__violations.push(e.violatedDirective));"
        "const s = document.createElement('script');"
        "s.textContent = 'window.__pwned = true';"
        "document.body.appendChild(s);"
        "const i = document.createElement('img');"
        "i.src = 'http://127.0.0.1:9/x.png';"
        "document.body.appendChild(i);"
    )
    wait_for(lambda: len(browser.execute_script("return window.__violations") or []) >= 2, 5,
             "the CSP violations to be reported")
    assert browser.execute_script("return window.__pwned === undefined")
    violated = browser.execute_script("return window.__violations")
    assert any(v.startswith("script-src") for v in violated), violated
    assert any(v.startswith("img-src") for v in violated), violated
    console = browser.get_log("browser")
    assert any("Content Security Policy" in e["message"] for e in console), console
    # Chrome announces the image request, then blocks it before it leaves.
    net = _network(browser)
    ids = {m["params"]["requestId"] for m in net if m["method"] == "Network.requestWillBeSent"
           and m["params"]["request"]["url"] == "http://127.0.0.1:9/x.png"}
    failed = {m["params"]["requestId"]: m["params"].get("blockedReason") for m in net
              if m["method"] == "Network.loadingFailed"}
    assert ids and all(failed.get(i) == "csp" for i in ids), (ids, failed)
    assert not [m for m in net if m["method"] == "Network.responseReceived"
                and m["params"]["requestId"] in ids]

    # -- no path, no secret ----------------------------------------------------------
    page = browser.page_source
    for s in secrets_of(home):
        assert s not in page, s

    # -- a screenshot, as a test artifact ------------------------------------------
    browser.get(url)  # the page as served, without the injected elements
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1280, min(max(int(height) + 40, 800), 6000))
    out_dir = Path(os.environ.get("KEYMGR_TEST_ARTIFACTS") or tmp_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    shot = out_dir / "operator-page.png"
    assert browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    print(f"operator page screenshot: {shot}")
    rc, _ = d.stop()
    assert rc == 0


def test_chromium_is_the_systems(browser: Any) -> None:
    """The browser and its driver are Debian's, not a downloaded build."""
    caps = browser.capabilities
    assert caps["browserName"] in ("chrome", "chromium")
    driver_version = caps["chrome"]["chromedriverVersion"].split(" ")[0]
    assert driver_version.split(".")[0] == caps["browserVersion"].split(".")[0]
    assert shutil.which("chromedriver") in (CHROMEDRIVER, None)


def test_chain_check_reads_only_its_prefix_and_stops_when_cancelled(tmp_path: Path) -> None:
    from keymgr.audit import GENESIS, AuditLog, seal
    from keymgr.model import AuditAnchor

    events = seal(({"ts": "2031-03-01T08:00:00Z", "event": "x", "n": i} for i in range(5000)),
                  0, GENESIS, "test")
    path = tmp_path / "audit.jsonl"
    data = b"".join(json.dumps(ev).encode() + b"\n" for ev in events)
    # Lines appended after the anchor was read are not this check's business.
    path.write_bytes(data + b'{"seq": 5001, "torn')
    anchor = AuditAnchor(seq=5000, hash=events[-1]["hash"])
    r = ui._Prefix(AuditLog(path), len(data), lambda: False).check(anchor)
    assert r.events == 5000
    with pytest.raises(ui._Cancelled):
        ui._Prefix(AuditLog(path), len(data), lambda: True).check(anchor)
