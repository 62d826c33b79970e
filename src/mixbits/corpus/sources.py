"""The text sources mixbits knows by name, one kind of text each, and how each is read.

| name     | kind                                  | where it comes from |
|----------|---------------------------------------|---------------------|
| pydoc    | technical documentation               | CPython's `pydoc_data.topics`, keys sorted, joined by blank lines |
| python   | source code                           | CPython's standard library, its top-level `*.py` files in name order |
| fortunes | quotations, jokes, dialogue           | Debian `fortunes-min` and `fortunes` 1:1.99.1-7.3, every file but ascii-art, `%` lines dropped |
| jargon   | expository prose (a lexicon)          | Debian `dict-jargon` 4.4.7-3.1: the Jargon File as dictd text |
| austen   | narrative fiction                     | Debian `r-cran-janeaustenr` 1.0.0-1: Jane Austen's six novels |
| kjv      | scripture (Early Modern English)      | Debian `bible-kjv` 4.38: the King James Bible as its `bible` program prints it, verse numbers dropped |

The Debian sources carry the sha256 of their text, checked on every read:
a different package build is an error, not a silent change of protocol. The
two from CPython follow the running Python, and results record their hashes.
"""

from __future__ import annotations

import gzip
import hashlib
import re
import subprocess
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..data import Text, load_text
from ..errors import TextError
from . import debian
from .rdata import read_lazyload

FORTUNES_VERSION = "1:1.99.1-7.3"


@dataclass(frozen=True)
class Source:
    name: str
    kind: str
    origin: str
    read: Callable[[], str]
    packages: tuple[tuple[str, str], ...] = ()  # Debian (package, version) pairs it is read from
    sha256: str | None = None  # the recorded hash of its text, where it is pinned

    def text(self) -> Text:
        text = self.read()
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
        if self.sha256 is not None and digest != self.sha256:
            raise TextError(f"text source {self.name} reads as sha256 {digest[:12]}, not the recorded "
                            f"{self.sha256[:12]}; refetch it with `mixbits corpus fetch --force`")
        return Text(text, self.name, digest)

    def describe(self) -> dict:
        return {"name": self.name, "kind": self.kind, "origin": self.origin,
                "packages": [f"{p}={v}" for p, v in self.packages]}


def _pydoc() -> str:
    return load_text().text


def _python() -> str:
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    if not files:
        raise TextError("CPython's standard library sources are not installed; give your own text with --calib-text")
    return "\n\n".join(path.read_text(encoding="utf-8") for path in files)


def _fortunes() -> str:
    files = []
    for package in ("fortunes-min", "fortunes"):
        folder = debian.unpacked(package, FORTUNES_VERSION) / "usr/share/games/fortunes"
        files += [p for p in folder.iterdir() if "." not in p.name and not p.is_symlink() and p.name != "ascii-art"]
    parts = []
    for path in sorted(files, key=lambda p: p.name):
        text = _overstrike(path.read_text(encoding="utf-8"))
        parts.append(re.sub(r"(?m)^%$", "", text))
    return "\n".join(parts)


def _overstrike(text: str) -> str:
    """Text as a terminal shows it: each backspace erases the character before it (underlined, bold)."""
    while "\b" in text:
        shorter = re.sub("[^\b\n]\b", "", text)
        shorter = re.sub("(?m)^\b+", "", shorter)  # a backspace at the start of a line erases nothing
        if shorter == text:
            break
        text = shorter
    return text.replace("\b", "")


def _jargon() -> str:
    path = debian.unpacked("dict-jargon", "4.4.7-3.1") / "usr/share/dictd/jargon.dict.dz"
    return gzip.decompress(path.read_bytes()).decode("utf-8")


def _austen() -> str:
    folder = debian.unpacked("r-cran-janeaustenr", "1.0.0-1") / "usr/lib/R/site-library/janeaustenr/data"
    novels = read_lazyload(folder)
    if len(novels) != 6:
        raise TextError(f"{folder} holds {len(novels)} novels, not Jane Austen's six; refetch with `mixbits corpus fetch --force`")
    return "\n\n".join("\n".join(line.rstrip() for line in lines) for lines in novels.values())


def _kjv() -> str:
    program = debian.unpacked("bible-kjv", "4.38") / "usr/bin/bible"
    data = debian.unpacked("bible-kjv-text", "4.38") / "usr/lib"
    done = subprocess.run([str(program), "-p", str(data), "gen1:1-rev22:21"], capture_output=True, timeout=120)
    if done.returncode != 0 or not done.stdout:
        raise TextError(f"{program} did not print the Bible (exit {done.returncode}); refetch with `mixbits corpus fetch --force`")
    text = done.stdout.decode("utf-8")
    return re.sub(r"(?m)^ *\d+ ", "", text).strip() + "\n"


SOURCES = {source.name: source for source in (
    Source("pydoc", "technical documentation", "CPython pydoc_data.topics", _pydoc),
    Source("python", "source code", "CPython standard library, top-level *.py", _python),
    Source("fortunes", "quotations, jokes, dialogue", "Debian fortunes-min and fortunes " + FORTUNES_VERSION, _fortunes,
           (("fortunes-min", FORTUNES_VERSION), ("fortunes", FORTUNES_VERSION)),
           "180f6444bb3b4f7504d561abf3cec85bd1279fe978a8dbd2164ba72d5cd42f63"),
    Source("jargon", "expository prose (a lexicon)", "Debian dict-jargon 4.4.7-3.1", _jargon,
           (("dict-jargon", "4.4.7-3.1"),),
           "6c8118c277d0b00736d406d4941b77b69932d6ab125f7179ff88fe12939cc19e"),
    Source("austen", "narrative fiction", "Debian r-cran-janeaustenr 1.0.0-1 (Jane Austen's novels)", _austen,
           (("r-cran-janeaustenr", "1.0.0-1"),),
           "ae4140c6e5ab543cc81f68358120258f0935ac9e27a30f44a7a564b349307867"),
    Source("kjv", "scripture (Early Modern English)", "Debian bible-kjv 4.38 (King James Bible)", _kjv,
           (("bible-kjv", "4.38"), ("bible-kjv-text", "4.38")),
           "7765beafd1c2b14d1df65cf0946a96db13789f33d5d5bf025b107f386dd13314"),
)}


def source(name: str) -> Source:
    if name not in SOURCES:
        raise TextError(f"unknown text source {name!r}; choose from {', '.join(SOURCES)} or give a path")
    return SOURCES[name]


def fetch_all(force: bool = False) -> list[tuple[str, str]]:
    """Fetch every Debian package a source reads; return the (package, version) pairs."""
    pairs = sorted({pair for s in SOURCES.values() for pair in s.packages})
    for package, version in pairs:
        debian.fetch(package, version, force)
    return pairs
