"""The command blocks of the guides, as a reader would paste them, for ``test_guides.py``
and ``test_walkthrough.py`` (``guide_reading.py`` follows them).

The convention a doc writer follows (``docs/ml-team-guide.md``, "Writing the guides", says
the same for doc writers):

- A fenced block with no info string, or with ``sh``, ``bash``, ``shell`` or ``console``, is
  a **command block**: the test runs it with bash, in the order a reader follows the guides.
  Any other info string (``json``, ``toml``, ``python``, ``text``) marks a file's content
  or a command's output: it is never run. Write example output as ``text``.
- HTML comments on the lines right before a fence (blank lines between are allowed) give
  directives: ``<!-- guide-test: DIRECTIVE ... -->``, shell-quoted words:

  - ``skip reason="why"``: the block cannot run in a test (a package install, systemd, a
    container build, a server the test does not have). A reason is required.
  - ``background ready="REGEX"``: a long-running command (``serve``, ``start``): started in
    the background, the reader goes on once its output matches REGEX; stopped by its PID
    at the end of the test.
  - ``copy NAME=REGEX``: the reader copies what matches REGEX in the block's output (every
    match, in order), as one copies a printed token to send it on.
  - ``paste NAME``: the reader pastes a copied value into the block's input (a ``read``):
    the one that names the reader's site (``.<site>.`` inside it), else the last one.
  - ``exit=N``: the block is meant to end with exit status N (default 0).

- Example values stand for what a reader has (``EXAMPLE_VALUES`` below: the data
  directories under ``/var/lib/fedward``, ``coordinator.example.org``, ``/data/cohort.*``,
  the walkthrough's study and mapping under ``/data``, ``/opt/fedward/venv``); the test
  replaces them with its own. Nothing else is replaced:
  ``<placeholder>`` text or ``[--optional]`` synopses in a command block fail the test.
  Write the command as it runs and say in prose which options there are.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["COMMAND_LANGS", "EXAMPLE_VALUES", "Block", "GuideError", "read_blocks",
           "substitute"]

COMMAND_LANGS = frozenset({"", "sh", "bash", "shell", "console"})
DIRECTIVES = frozenset({"skip", "background", "copy", "paste", "exit"})

# Example value in a guide -> the name of the test's variable that replaces it. Longer
# values first, so that a path is replaced before a prefix of it.
EXAMPLE_VALUES: dict[str, str] = {
    "https://coordinator.example.org": "PORTAL_URL",
    "coordinator.example.org:9092": "FLEET_ADDRESS",
    "/var/lib/fedward/coordinator": "COORDINATOR_HOME",
    "/var/lib/fedward/site": "SITE_DIR",
    "/data/cohort.schema.json": "SCHEMA_PATH",
    "/data/tumour-mapping.yaml": "MAPPING_PATH",
    "/data/tumour_shape.yaml": "STUDY_PATH",
    "/data/cohort.csv": "DATA_PATH",
    "/opt/fedward/venv": "VENV",
}

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
_DIRECTIVE = re.compile(r"^\s*<!--\s*guide-test:\s*(?P<body>.*?)\s*-->\s*$")
_HEADING = re.compile(r"^(?P<level>#{1,6})\s+(?P<title>.+?)\s*#*\s*$")
_PLACEHOLDER = re.compile(r"<[a-z][a-z0-9 _-]*>|\[--[a-z]")


class GuideError(ValueError):
    """A guide breaks the convention above (the message names the file and line)."""


@dataclass
class Block:
    """One fenced block of a guide.

    Attributes:
        path: The markdown file.
        line: The line of the opening fence (1-based).
        lang: The info string's first word ('' for none).
        text: The block's content, its fence's indentation removed.
        section: The headings above it, outermost first.
        directives: ``skip``/``background``/``copy``/``paste``/``exit`` -> their words.
    """

    path: Path
    line: int
    lang: str
    text: str
    section: tuple[str, ...]
    directives: dict[str, list[str]] = field(default_factory=dict)

    @property
    def where(self) -> str:
        """``docs/x.md:12 (Section > Subsection)``, for failure messages."""
        return f"{self.path}:{self.line} ({' > '.join(self.section) or 'top'})"

    @property
    def is_command(self) -> bool:
        return self.lang in COMMAND_LANGS

    def option(self, directive: str, key: str) -> str | None:
        """The value of ``key=value`` among a directive's words, if given."""
        for word in self.directives.get(directive, []):
            k, sep, v = word.partition("=")
            if sep and k == key:
                return v
        return None


def _parse_directive(body: str, where: str) -> tuple[str, list[str]]:
    try:
        words = shlex.split(body)
    except ValueError as err:
        raise GuideError(f"{where}: cannot read the guide-test directive {body!r}: {err}") \
            from err
    if not words or words[0].split("=")[0] not in DIRECTIVES:
        raise GuideError(f"{where}: unknown guide-test directive {body!r}; known: "
                         f"{', '.join(sorted(DIRECTIVES))}")
    head, sep, value = words[0].partition("=")
    return head, ([value] if sep else []) + words[1:]


def read_blocks(path: Path, *, root: Path | None = None) -> list[Block]:
    """Every fenced block of a markdown file, with its directives, checked.

    Args:
        path: The markdown file.
        root: Shown paths are relative to it.

    Returns:
        The blocks in file order.

    Raises:
        GuideError: On an unclosed fence, an unknown directive, a directive that is not
            followed by a block, or a skip without a reason.
    """
    shown = path.relative_to(root) if root else path
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    headings: list[tuple[int, str]] = []
    pending: dict[str, list[str]] = {}
    pending_line = 0
    i = 0
    while i < len(lines):
        line = lines[i]
        m = _DIRECTIVE.match(line)
        if m:
            name, words = _parse_directive(m.group("body"), f"{shown}:{i + 1}")
            pending.setdefault(name, []).extend(words)
            pending_line = pending_line or i + 1
            i += 1
            continue
        fence = _FENCE.match(line)
        if fence:
            indent, marker = fence.group("indent"), fence.group("fence")
            info = fence.group("info").strip()
            body: list[str] = []
            j = i + 1
            while j < len(lines) and not (lines[j].strip().startswith(marker)
                                          and lines[j].strip().strip(marker[0]) == ""):
                text = lines[j]
                body.append(text[len(indent):] if text.startswith(indent) else text.lstrip())
                j += 1
            if j == len(lines):
                raise GuideError(f"{shown}:{i + 1}: the fence is never closed")
            block = Block(path=shown, line=i + 1, lang=info.split()[0] if info else "",
                          text="\n".join(body) + "\n",
                          section=tuple(t for _, t in headings), directives=pending)
            if "skip" in pending and not (block.option("skip", "reason") or "").strip():
                raise GuideError(f"{block.where}: `guide-test: skip` needs reason=\"why this "
                                 "block cannot run in a test\"")
            blocks.append(block)
            pending, pending_line = {}, 0
            i = j + 1
            continue
        if pending and line.strip():
            raise GuideError(f"{shown}:{pending_line}: a guide-test directive must come right "
                             "before a fenced block (only blank lines between)")
        h = _HEADING.match(line)
        if h:
            level = len(h.group("level"))
            headings = [(lv, t) for lv, t in headings if lv < level] + [(level, h.group("title"))]
        i += 1
    if pending:
        raise GuideError(f"{shown}:{pending_line}: a guide-test directive with no block after it")
    return blocks


def substitute(block: Block, values: dict[str, str]) -> str:
    """The block's text with the example values replaced by the test's, checked.

    Args:
        block: A command block.
        values: ``EXAMPLE_VALUES``' variable names -> the test's values (a value missing
            here leaves its example in place, which then fails as it would for a reader).

    Returns:
        The text to run.

    Raises:
        GuideError: If the block holds a ``<placeholder>`` or an ``[--option]`` synopsis.
    """
    text = block.text
    for example, name in EXAMPLE_VALUES.items():
        if name in values:
            text = text.replace(example, values[name])
    for n, line in enumerate(text.splitlines()):
        code = line.split(" #", 1)[0]   # a comment may say anything
        m = _PLACEHOLDER.search(code)
        if m:
            raise GuideError(
                f"{block.path}:{block.line + 1 + n}: {m.group(0)!r} in a command block: a "
                "reader cannot paste it. Write the command as it runs (options in the prose, "
                "earlier output in a shell variable), or mark the block "
                "`<!-- guide-test: skip reason=\"...\" -->` if it cannot run in a test")
    return text
