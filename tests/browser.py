"""Headless Chromium (Debian's `chromium`) for tests: open a page with the network off, read what it drew;
or drive it (Playwright) through a live page of the MLflow UI, as the README's command serves it."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from html.parser import HTMLParser
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import pytest
from helpers import wait_for

if TYPE_CHECKING:
    from playwright.sync_api import Page

# No request leaves the browser: every host name fails to resolve and every http(s) request goes to a
# proxy on a port nobody listens on; no background traffic (updates, sync, safe browsing) either.
OFFLINE = (
    "--proxy-server=127.0.0.1:9",
    "--host-resolver-rules=MAP * ~NOTFOUND",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--no-first-run",
)


class Mark(NamedTuple):
    """One mark vega drew: its type (`line`, `rect`, ...), the layer of the spec it belongs to, the
    aria-label naming its data (`epoch: 1; ...; field: val_loss`) and its SVG path."""

    kind: str
    layer: str
    label: str = ""
    path: str = ""


_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


def chromium() -> str:
    """The browser's path; CI (`.ci/run` installs it) fails without it, a developer's run skips."""
    found = shutil.which("chromium")
    if found is None:
        message = "Debian's chromium is not installed (apt-get install -y chromium)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def rendered_dom(page: Path, profile: Path, budget_ms: int = 10_000) -> str:
    """The page's DOM after its scripts ran for `budget_ms` of virtual time, opened from the file offline."""
    command = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}", *OFFLINE]
    command += [f"--virtual-time-budget={budget_ms}", "--dump-dom", page.resolve().as_uri()]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"chromium exited {done.returncode}: {done.stderr[-2000:]}"
    return done.stdout


class _Marks(HTMLParser):
    """Vega's SVG marks per DVC plot: DVC puts each plot in a `<div id=...>`; vega puts each mark (a
    line, a rect, ...) in a `<g class="mark-<type> role-mark ...">` group, with an aria-label naming its data."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[tuple[str, Mark | None]] = []  # (tag, what a mark in it is, if it is a mark group)
        self.plot: str | None = None
        self.plot_depth = 0
        self.marks: dict[str, list[Mark]] = defaultdict(list)
        self.texts: dict[str, list[str]] = defaultdict(list)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {key: value or "" for key, value in attrs}
        if tag == "div" and "id" in attributes and self.plot is None:
            self.plot, self.plot_depth = attributes["id"], len(self.stack)
            self.marks[self.plot] = []
        group = self.stack[-1][1] if self.stack else None
        if self.plot is not None and group:
            label, path = attributes.get("aria-label", ""), attributes.get("d", "")
            self.marks[self.plot].append(Mark(group.kind, group.layer, label, path))
        if tag not in _VOID:
            classes = [*attributes.get("class", "").split(), "", ""]
            mark_group = classes[1] == "role-mark" and classes[0].startswith("mark-")
            self.stack.append((tag, Mark(classes[0].removeprefix("mark-"), classes[2]) if mark_group else None))

    def handle_endtag(self, tag: str) -> None:
        if tag in _VOID or not self.stack:
            return
        self.stack.pop()
        if self.plot is not None and len(self.stack) == self.plot_depth:
            self.plot = None

    def handle_data(self, data: str) -> None:
        if self.plot is not None and data.strip() and not (self.stack and self.stack[-1][0] == "script"):
            self.texts[self.plot].append(data.strip())


def plot_marks(dom: str) -> dict[str, list[Mark]]:
    """For each plot of a `dvc plots` page, every mark vega drew in it."""
    parser = _Marks()
    parser.feed(dom)
    return dict(parser.marks)


def plot_texts(dom: str) -> dict[str, list[str]]:
    """For each plot of a `dvc plots` page: the text shown in its place (outside scripts)."""
    parser = _Marks()
    parser.feed(dom)
    return dict(parser.texts)


# --- the MLflow UI, live ----------------------------------------------------------------------------

VIEWPORT = {"width": 1440, "height": 900}  # a laptop's first screen


@contextmanager
def live_page(viewport: dict[str, int] = VIEWPORT) -> Iterator[Page]:
    """A page of headless Chromium, driven by Playwright, that reaches nothing but this machine's 127.0.0.1
    (`OFFLINE`, but 127.0.0.1 resolves, and Chromium never sends loopback requests through its proxy),
    in a fresh profile."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as driver:
        flags = [flag for flag in OFFLINE if not flag.startswith("--host-resolver-rules")]
        flags += ["--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", "--no-sandbox", "--disable-gpu"]
        browser = driver.chromium.launch(executable_path=chromium(), args=flags)
        try:
            yield browser.new_page(viewport=viewport)  # type: ignore[arg-type]
        finally:
            browser.close()


def readme_ui(readme: Path) -> tuple[str, str]:
    """The README's command that starts the MLflow UI, and the link it tells the reader to open."""
    text = readme.read_text()
    command = re.search(r"```bash\n([^`]*?mlflow ui [^`]*?)\n```", text)
    link = re.search(r"<(http://127\.0\.0\.1:5000/[^>]+)>", text)
    assert command and link, "README.md has no `mlflow ui` command with a link to open"
    return command[1], link[1]


@contextmanager
def readme_mlflow_ui(workspace: Path, env: dict[str, str], port: int) -> Iterator[tuple[str, str]]:
    """The README's `mlflow ui` command, run in `workspace` (on `port` instead of 5000) until the block
    ends; yields its base URL and the README's link on that port, once the server answers."""
    import requests

    command, link = readme_ui(workspace / "README.md")
    command = command.removeprefix(". .venv/bin/activate && ")  # `env` has the venv first on PATH
    server = subprocess.Popen(
        ["bash", "-c", command.replace("--port 5000", f"--port {port}")],
        cwd=workspace,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        try:
            return requests.get(f"{base}/health", timeout=30).status_code == 200
        except requests.RequestException:
            return False

    try:
        wait_for(answers, "the README's `mlflow ui` answering", 600, process=server, every=0.2)  # a busy machine
        yield base, link.replace("127.0.0.1:5000", f"127.0.0.1:{port}")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


def wait_drawn(page: Page, selector: str, timeout_s: float = 120) -> None:
    """Wait until MLflow's page has drawn what `selector` finds (Playwright polls the DOM)."""
    page.locator(selector).first.wait_for(state="visible", timeout=timeout_s * 1000)


def on_first_screen(page: Page, selector: str) -> bool:
    """Whether the first element `selector` finds lies wholly inside the viewport, unscrolled."""
    box = page.locator(selector).first.bounding_box()
    size = page.viewport_size or VIEWPORT
    if not box:
        return False
    return (
        box["x"] >= 0
        and box["y"] >= 0
        and box["x"] + box["width"] <= size["width"]
        and (box["y"] + box["height"] <= size["height"])
    )
