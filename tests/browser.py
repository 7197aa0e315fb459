"""A headless Chromium driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``:
the browser reads NUL-terminated JSON commands on fd 3 and answers on fd 4), so the HTML report
test needs no browser-automation package. Nothing is injected into the page under test: console
messages, exceptions and log entries (failed loads, CSP violations) come as protocol events, and
the image check runs as a DevTools evaluation, which the page's CSP does not govern.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--disable-default-apps", "--mute-audio", "--hide-scrollbars",
         "--remote-debugging-pipe"]


@dataclass
class PageCheck:
    """What loading one page showed."""

    errors: list[str] = field(default_factory=list)  # console errors, exceptions, error log entries
    images: list[dict] = field(default_factory=list)  # per <img>: complete, naturalWidth/Height
    svgs: int = 0  # inline <svg> elements with a non-empty box
    title: str = ""
    text: str = ""
    screenshot: bytes = b""


class _Pipe:
    def __init__(self, process: subprocess.Popen, to_browser: int, from_browser: int) -> None:
        self.process, self.write_fd, self.read_fd = process, to_browser, from_browser
        self.buffer, self.next_id, self.events = b"", 0, []

    def send(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 30.0) -> dict:
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self.write_fd, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        for event in self.events:
            if event.get("method") == method:
                return event
        while True:
            event = self._read(deadline)
            self.events.append(event)
            if event.get("method") == method:
                return event

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or self.process.poll() is not None:
                raise TimeoutError("chromium did not answer")
            ready, _, _ = select.select([self.read_fd], [], [], left)
            if ready:
                chunk = os.read(self.read_fd, 1 << 20)
                if not chunk:
                    raise RuntimeError("chromium closed the DevTools pipe")
                self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)


_PROBE = """JSON.stringify({
  images: [...document.images].map(i => ({complete: i.complete, naturalWidth: i.naturalWidth,
                                          naturalHeight: i.naturalHeight})),
  svgs: [...document.querySelectorAll('svg')].filter(s => s.getBoundingClientRect().width > 0).length,
  title: document.title, text: document.body.innerText})"""


def check_page(path: Path, width: int = 1200, timeout: float = 60.0) -> PageCheck:
    """Open ``path`` in headless Chromium; collect errors, the images' state and a full-page PNG."""
    profile = tempfile.mkdtemp(prefix="otbr-chromium-")
    # the browser reads commands on fd 3 and answers on fd 4; the child's ends are first moved to
    # fds >= 10 (so they cannot be 3 or 4 already), then bash (dash refuses fds above 9) puts them
    # in place and execs Chromium (no preexec_fn, which is unsafe in a process with threads)
    commands_r, to_browser_w = os.pipe()
    from_browser_r, answers_w = os.pipe()
    child_r, child_w = (fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (commands_r, answers_w))
    for fd in (commands_r, answers_w):
        os.close(fd)
    shell = f'exec "$0" "$@" 3<&{child_r} 4>&{child_w} {child_r}<&- {child_w}>&-'
    process = subprocess.Popen(["/bin/bash", "-c", shell, CHROMIUM, *FLAGS, f"--user-data-dir={profile}",
                                f"--window-size={width},900", "about:blank"], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, pass_fds=(child_r, child_w))
    os.close(child_r)
    os.close(child_w)
    pipe = _Pipe(process, to_browser_w, from_browser_r)
    try:
        return _load(pipe, path, width, timeout)
    finally:
        try:
            pipe.send("Browser.close", timeout=5)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        os.close(to_browser_w)
        os.close(from_browser_r)
        shutil.rmtree(profile, ignore_errors=True)


def _load(pipe: _Pipe, path: Path, width: int, timeout: float) -> PageCheck:
    target = pipe.send("Target.createTarget", {"url": "about:blank"}, timeout=timeout)["targetId"]
    session = pipe.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    for domain in ("Page", "Runtime", "Log"):
        pipe.send(f"{domain}.enable", session=session)
    pipe.events.clear()
    pipe.send("Page.navigate", {"url": path.resolve().as_uri()}, session=session)
    pipe.wait_for("Page.loadEventFired", timeout)
    time.sleep(0.3)  # let late console messages arrive
    probe = json.loads(pipe.send("Runtime.evaluate", {"expression": _PROBE, "returnByValue": True},
                                 session=session)["result"]["value"])
    metrics = pipe.send("Page.getLayoutMetrics", session=session)
    height = int(metrics["cssContentSize"]["height"])
    shot = pipe.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True,
                                                "clip": {"x": 0, "y": 0, "width": width, "height": height,
                                                         "scale": 1}}, session=session, timeout=timeout)
    pipe.send("Runtime.evaluate", {"expression": "0"}, session=session)  # drain pending events
    return PageCheck(_errors(pipe.events), probe["images"], probe["svgs"], probe["title"], probe["text"],
                     base64.b64decode(shot["data"]))


def _errors(events: list[dict]) -> list[str]:
    found = []
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            found.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
        elif method == "Runtime.exceptionThrown":
            found.append("exception: " + params["exceptionDetails"].get("text", ""))
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            found.append(f"log ({params['entry']['source']}): {params['entry']['text']}")
    return found
