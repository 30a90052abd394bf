"""Open the Dagster UI of a materialized nola instance in headless Chromium, check what it shows,
and save screenshots.

    .venv/bin/nola demo                                   # or any instance with materializations
    .venv/bin/python scripts/browser_check.py --dagster-home .dagster_home --out docs/screenshots

Starts `dagster-webserver` on a free loopback port against DAGSTER_HOME, starts Debian's
Chromium headless with a fresh profile, drives it over the Chrome DevTools protocol (a small
client on `websocket-client`), and checks two pages:

1. the asset graph (global lineage, every group open): every asset of `nola_job` is drawn;
2. one asset's page (default `evaluation`, partition `fashion_mini`): the asset name and the
   labels and values of its last materialization's metadata, as the instance recorded them, are
   rendered.

Each page is saved as a PNG. Exits 0 when every check passes, 1 otherwise (saying what was
missing), 2 when Chromium or the webserver cannot start. No network beyond 127.0.0.1.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "chromium", "chromium-browser",
                       "google-chrome")
# The flags this machine needs: no sandbox as root, no GPU, and nothing that phones home
# (background networking is refused here and slows every start).
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio",
)
LOCATION = "nola"
JOB = "nola_job"


class CheckFailed(Exception):
    """A page did not show what it should."""


class CannotStart(Exception):
    """Chromium or the webserver did not come up."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def find_chromium(explicit: str | None = None) -> str:
    for candidate in ([explicit] if explicit else CHROMIUM_CANDIDATES):
        path = shutil.which(candidate) if candidate else None
        if path:
            return path
    raise CannotStart("no Chromium found (apt-get install chromium, or pass --chromium)")


def _wait_http(url: str, timeout: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise CannotStart(f"process exited with {process.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    raise CannotStart(f"{url} did not answer within {timeout:.0f}s")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


# --------------------------------------------------------------------------------------------
# The webserver


@contextmanager
def dagster_webserver(dagster_home: Path, *, timeout: float = 120.0, log: Path | None = None) -> Iterator[str]:
    """`dagster-webserver` for the nola code location on 127.0.0.1:<free port>; yields its base URL."""
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="nola-webserver-"))
    workspace = workdir / "workspace.yaml"
    workspace.write_text(json.dumps({"load_from": [{"python_module": {
        "module_name": "nola_assets.definitions", "attribute": "defs",
        "location_name": LOCATION, "working_directory": str(ROOT)}}]}))
    webserver = shutil.which("dagster-webserver", path=str(Path(sys.executable).parent)) or "dagster-webserver"
    env = {**os.environ, "DAGSTER_HOME": str(dagster_home.resolve())}
    output = open(log or workdir / "webserver.log", "w")
    process = subprocess.Popen(
        [webserver, "--host", "127.0.0.1", "--port", str(port), "--workspace", str(workspace)],
        env=env, stdout=output, stderr=subprocess.STDOUT, cwd=ROOT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        try:
            _wait_http(f"{base}/server_info", timeout, process)
        except CannotStart as error:
            output.flush()
            tail = Path(output.name).read_text(errors="replace")[-1500:]
            raise CannotStart(f"dagster-webserver: {error}; its log ends:\n{tail}") from None
        yield base
    finally:
        _stop(process)
        output.close()
        shutil.rmtree(workdir, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Chromium over the DevTools protocol


class DevTools:
    """The few Chrome DevTools protocol calls a page check needs, over one websocket."""

    def __init__(self, websocket_url: str, timeout: float = 30.0):
        import websocket  # websocket-client

        self._socket = websocket.create_connection(websocket_url, timeout=timeout, suppress_origin=True)
        self._next_id = 0

    def call(self, method: str, **params) -> dict:
        self._next_id += 1
        message_id = self._next_id
        self._socket.send(json.dumps({"id": message_id, "method": method, "params": params}))
        while True:  # events arrive in between; only the answer with our id matters
            message = json.loads(self._socket.recv())
            if message.get("id") == message_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            details = result['exceptionDetails']
            raise RuntimeError(f"page script failed: {details.get('exception', {}).get('description') or details.get('text')}")
        return result["result"].get("value")

    def close(self) -> None:
        self._socket.close()


@contextmanager
def chromium(binary: str, *, width: int = 1600, height: int = 1000, timeout: float = 60.0) -> Iterator[DevTools]:
    """Headless Chromium with a fresh profile; yields a DevTools session on its first tab."""
    profile = Path(tempfile.mkdtemp(prefix="nola-chromium-"))
    process = subprocess.Popen(
        [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-address=127.0.0.1",
         "--remote-debugging-port=0", f"--window-size={width},{height}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    session = None
    try:
        active = profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while not (active.exists() and active.read_text().strip()):
            if process.poll() is not None:
                raise CannotStart(f"chromium exited with {process.returncode}: "
                                  f"{process.stderr.read().decode(errors='replace')[-800:]}")
            if time.monotonic() > deadline:
                raise CannotStart(f"chromium gave no DevTools port within {timeout:.0f}s")
            time.sleep(0.1)
        port = int(active.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as response:
            pages = [t for t in json.load(response) if t.get("type") == "page"]
        session = DevTools(pages[0]["webSocketDebuggerUrl"], timeout=timeout)
        session.call("Page.enable")
        session.call("Runtime.enable")
        session.call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                     deviceScaleFactor=1, mobile=False)
        yield session
    finally:
        if session is not None:
            session.close()
        _stop(process)
        shutil.rmtree(profile, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Page checks


@dataclass
class PageCheck:
    name: str
    path: str
    expected: Sequence[str]
    # JavaScript run on every poll until the page shows everything (e.g. expand collapsed groups).
    prepare: str | None = None
    # JavaScript run once everything is shown, before the picture (e.g. close a side panel);
    # the texts are checked again afterwards.
    finish: str | None = None
    # localStorage entries set (on the same origin) before the page is opened.
    storage: dict[str, str] = field(default_factory=dict)
    # The texts whose appearance ends the wait (default: every expected text); the others are
    # still checked. A tall asset graph draws only the nodes inside the viewport.
    wait_for: Sequence[str] | None = None
    found: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    screenshot: Path | None = None


# Dagster shows a one-time "join the community" dialog; it would cover the screenshot.
DISMISS_DIALOGS = """
(() => {
  for (const button of document.querySelectorAll('button')) {
    const label = button.innerText.trim();
    if (label === 'Skip' || label === 'Dismiss') { button.click(); }
  }
  return true;
})()
"""
# What a person can read on the page: the text, plus the full names the UI puts in tooltips
# where a label is shortened.
PAGE_TEXT = """
(() => document.body ? document.body.innerText + ' ' +
  [...document.querySelectorAll('[data-tooltip]')].map(e => e.getAttribute('data-tooltip')).join(' ') : '')()
"""
# Asset graph: expand every collapsed asset group, so that every asset node is drawn.
EXPAND_GRAPH = """
(() => {
  for (const box of document.querySelectorAll('[class*=CollapsedGroupNode_collapsedGroupNodeBox]')) { box.click(); }
  return true;
})()
"""
# Asset graph: close the tree of groups on the left, which leaves the graph more room.
HIDE_GROUP_TREE = """
(() => {
  for (const button of document.querySelectorAll('button')) {
    // the icon-only panel toggle beside "Jump to..." (the labelled one is the main navigation)
    if (!button.innerText.trim() && button.querySelector('[aria-label="panel_show_right"]')) {
      button.click();
      return true;
    }
  }
  return false;
})()
"""


def shown(name: str, text: str) -> bool:
    """`name` is on the page, whole or shortened by the UI in the middle (`prompt_tu…_encoder`)."""
    if name in text:
        return True
    for token in text.split():
        for ellipsis in ("\u2026", "..."):
            if ellipsis in token:
                head, _, tail = token.partition(ellipsis)
                if len(head) >= 3 and len(tail) >= 3 and name.startswith(head) and name.endswith(tail):
                    return True
    return False


def run_check(tools: DevTools, base: str, check: PageCheck, out: Path, *, timeout: float = 90.0,
              settle: float = 1.5) -> PageCheck:
    if check.storage:
        tools.call("Page.navigate", url=f"{base}/server_info")
        _wait_for(tools, "document.readyState === 'complete'", 30)
        for key, value in check.storage.items():
            tools.evaluate(f"localStorage.setItem({json.dumps(key)}, {json.dumps(value)}), true")
    tools.call("Page.navigate", url=base + check.path)
    deadline = time.monotonic() + timeout
    while True:
        tools.evaluate(DISMISS_DIALOGS)
        text = tools.evaluate(PAGE_TEXT) or ""
        check.found = [s for s in check.expected if shown(s, text)]
        check.missing = [s for s in check.expected if not shown(s, text)]
        waiting = [s for s in (check.wait_for or check.expected) if not shown(s, text)]
        if not waiting or time.monotonic() > deadline:
            break
        if check.prepare and len(text) > 200:
            tools.evaluate(check.prepare)
        time.sleep(0.5)
    if check.finish and not check.missing:
        tools.evaluate(check.finish)
        time.sleep(0.5)
        text = tools.evaluate(PAGE_TEXT) or ""
        check.missing = [s for s in check.expected if not shown(s, text)]
        check.found = [s for s in check.expected if shown(s, text)]
    time.sleep(settle)  # let the graph layout and fonts finish before the picture
    tools.evaluate(DISMISS_DIALOGS)
    shot = tools.call("Page.captureScreenshot", format="png")
    out.mkdir(parents=True, exist_ok=True)
    check.screenshot = out / f"{check.name}.png"
    check.screenshot.write_bytes(base64.b64decode(shot["data"]))
    return check


def _wait_for(tools: DevTools, expression: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not tools.evaluate(expression):
        if time.monotonic() > deadline:
            raise CannotStart(f"page never satisfied {expression!r}")
        time.sleep(0.2)


def _metadata_text(value) -> str | None:
    """How the UI prints a metadata value, for the kinds it prints as plain text."""
    from dagster import MetadataValue

    raw = value.value if isinstance(value, MetadataValue) else value
    if isinstance(raw, bool):
        return None
    if isinstance(raw, int):
        return f"{raw:,}" if abs(raw) >= 1000 else str(raw)
    if isinstance(raw, str) and 0 < len(raw) <= 80 and "\n" not in raw:
        return raw
    return None


def expected_from_instance(dagster_home: Path, asset: str) -> tuple[list[str], list[str], list[str]]:
    """(every asset name of the job, its asset groups, labels + plain values of `asset`'s last
    materialization as the instance recorded them)."""
    from dagster import AssetKey, DagsterInstance

    from nola_assets.definitions import defs

    job = defs.resolve_job_def(JOB)
    keys = job.asset_layer.executable_asset_keys
    names = sorted({key.to_user_string() for key in keys})
    graph = defs.resolve_asset_graph()
    groups = sorted({graph.get(key).group_name for key in keys})
    instance = DagsterInstance.from_config(str(dagster_home))
    try:
        event = instance.get_latest_materialization_event(AssetKey(asset))
    finally:
        instance.dispose()
    if event is None or event.asset_materialization is None:
        raise CheckFailed(f"{asset} has never been materialized in {dagster_home}")
    metadata = event.asset_materialization.metadata
    expected = [asset, *metadata.keys()]
    expected += [text for text in map(_metadata_text, metadata.values()) if text]
    return names, groups, expected


def browser_check(dagster_home: Path, out: Path, *, asset: str = "evaluation", partition: str | None = "fashion_mini",
                  chromium_binary: str | None = None, timeout: float = 90.0,
                  base_url: str | None = None, webserver_log: Path | None = None,
                  graph_wait_for: Sequence[str] | None = None) -> list[PageCheck]:
    """Run both page checks; starts a webserver on `dagster_home` unless `base_url` is given.
    `graph_wait_for`: the asset names whose drawing ends the graph check's wait (default all)."""
    names, groups, materialization = expected_from_instance(dagster_home, asset)
    out.mkdir(parents=True, exist_ok=True)
    binary = find_chromium(chromium_binary)
    query = f"?partition={partition}" if partition else ""
    # The global lineage graph with every group open (the UI keeps that choice in localStorage;
    # EXPAND_GRAPH clicks the groups open should that key ever change).
    expanded = json.dumps({"expanded": ",".join(f"global@global:{group}" for group in groups)})
    checks = [
        PageCheck("asset_graph", "/asset-groups", names, prepare=EXPAND_GRAPH, finish=HIDE_GROUP_TREE,
                  storage={"asset-graph-open-graph-nodes-global-__GLOBAL__": expanded}, wait_for=graph_wait_for),
        PageCheck("asset_page", f"/assets/{asset}{query}", materialization),
    ]
    with ExitStack() as stack:
        base = base_url or stack.enter_context(dagster_webserver(dagster_home, log=webserver_log))
        tools = stack.enter_context(chromium(binary))
        for check in checks:
            run_check(tools, base, check, out, timeout=timeout)
    return checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dagster-home", default=os.environ.get("DAGSTER_HOME", ".dagster_home"),
                        help="instance to show (default $DAGSTER_HOME, else .dagster_home)")
    parser.add_argument("--out", default="docs/screenshots", help="folder for the PNGs (default docs/screenshots)")
    parser.add_argument("--asset", default="evaluation", help="asset whose page is checked (default evaluation)")
    parser.add_argument("--partition", default="fashion_mini", help="partition shown on that page ('' for none)")
    parser.add_argument("--chromium", help="Chromium binary (default /usr/bin/chromium)")
    parser.add_argument("--timeout", type=float, default=90.0, help="seconds per page (default 90)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        checks = browser_check(Path(args.dagster_home), out, asset=args.asset, partition=args.partition or None,
                               chromium_binary=args.chromium, timeout=args.timeout)
    except CannotStart as error:
        print(f"browser_check: cannot start: {error}", file=sys.stderr)
        return 2
    except CheckFailed as error:
        print(f"browser_check: {error}", file=sys.stderr)
        return 1
    failed = False
    for check in checks:
        status = "ok" if not check.missing else "MISSING " + ", ".join(map(repr, check.missing))
        print(f"{check.name}: {len(check.found)}/{len(check.expected)} expected texts; {status}; {check.screenshot}")
        failed |= bool(check.missing)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
