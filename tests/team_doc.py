"""docs/team.md as the script of tests/test_team.py: the commands of its ```bash blocks and the statements
of its ```sql block, which the test looks up as it runs them, so that the page and the test cannot drift
apart. The page's example host names, ports, folders and password are replaced by the test's own."""

from __future__ import annotations

import re
import shlex

from workspace import REPO

PAGE = REPO / "docs/team.md"
# Commands of the page that the test does not run, and why
NOT_RUN = {
    shlex.join(["pip", "install", "-c", "requirements.lock", "-e", ".[team]"]): "the tests' environment has it",
}
_BLOCK = re.compile(r"^```(bash|sql)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def normalized(line: str) -> str:
    """A command as its words, without comments: how the page and the test compare commands."""
    return shlex.join(shlex.split(line, comments=True))


def blocks(kind: str) -> list[str]:
    return [body for found_kind, body in _BLOCK.findall(PAGE.read_text()) if found_kind == kind]


class TeamDoc:
    """The page's commands, with `places` (page value -> the test's, replaced inside any word) and
    `words` (page word -> the test's, replaced where a word is exactly that)."""

    def __init__(self, places: dict[str, str], words: dict[str, str]) -> None:
        self.places = dict(sorted(places.items(), key=lambda item: -len(item[0])))  # longest first
        self.words = words
        self.commands: list[str] = []
        for body in blocks("bash"):
            for line in body.replace("\\\n", " ").splitlines():
                if line.strip():
                    self.commands.append(normalized(line))
        self.ran: set[str] = set()

    def __call__(self, line: str, **fill: str) -> list[list[str]]:
        """The command `line` of the page (it must be there, word for word), as argument lists to run
        one after the other (split at `&&`), with the test's places and `fill` for `<placeholders>`."""
        key = normalized(line)
        assert key in self.commands, f"docs/team.md has no command `{line}`: the test runs what the page says"
        self.ran.add(key)
        parts: list[list[str]] = [[]]
        for word in shlex.split(key):
            if word == "&&":
                parts.append([])
            else:
                parts[-1].append(self.here(word, fill))
        return parts

    def here(self, word: str, fill: dict[str, str] | None = None) -> str:
        if word in self.words:
            return self.words[word]
        for page, test in {**self.places, **{f"<{key}>": value for key, value in (fill or {}).items()}}.items():
            word = word.replace(page, test)
        return word

    def sql(self, password: str) -> list[str]:
        """The statements of the page's SQL block, with the test's password for the page's."""
        statements = " ".join(blocks("sql")).split(";")
        return [" ".join(s.split()).replace("'change-me'", password) for s in statements if s.strip()]

    def not_run(self) -> list[str]:
        """The page's commands that no test ran (and that NOT_RUN does not excuse)."""
        return [command for command in self.commands if command not in self.ran and command not in NOT_RUN]
