"""Headless Chromium (Debian's `chromium`) for tests: open a page with the network off, read what it drew."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections import defaultdict
from html.parser import HTMLParser
from pathlib import Path
from typing import NamedTuple

import pytest

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
