"""Debian packages as pinned text sources: downloaded with apt-get, unpacked into mixbits' cache.

Nothing is installed on the system: `apt-get download` fetches the .deb (apt
checks it against the signed archive) and `dpkg-deb -x` unpacks it under
`<cache>/corpus/debian/<package>_<version>/`, written under a temporary name
and renamed into place. What a source reads from the tree is checked against
the recipe's recorded hash (`corpus.sources`), so a different package build
cannot pass for the pinned one.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from ..cache import cache_root
from ..errors import TextError

COMPLETE = ".mixbits-complete"


def package_root(package: str, version: str) -> Path:
    return cache_root() / "corpus" / "debian" / f"{package}_{version.replace(':', '%3a')}"


def unpacked(package: str, version: str) -> Path:
    """The unpacked tree of `package` at `version`, or a one-line error saying how to fetch it."""
    root = package_root(package, version)
    if not (root / COMPLETE).exists():
        raise TextError(f"text source package {package} {version} is not fetched; run `mixbits corpus fetch` "
                        f"(Debian's apt-get), or give your own text with --calib-text/--text")
    return root


def fetch(package: str, version: str, force: bool = False) -> Path:
    """Download and unpack `package`=`version` unless it is already in the cache (or `force`)."""
    root = package_root(package, version)
    if (root / COMPLETE).exists() and not force:
        return root
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise TextError(f"fetching {package} needs Debian's {tool}, which is not on PATH; "
                            f"give your own text with --calib-text/--text instead")
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent, prefix=".fetch-") as work:
        work = Path(work)
        _run(["apt-get", "download", "-q", f"{package}={version}"], work, package, version)
        debs = list(work.glob("*.deb"))
        if len(debs) != 1:
            raise TextError(f"apt-get download {package}={version} gave {len(debs)} files, expected one .deb")
        tree = work / "tree"
        _run(["dpkg-deb", "-x", str(debs[0]), str(tree)], work, package, version)
        (tree / COMPLETE).write_text(f"{package} {version}\n")
        if root.exists():
            shutil.rmtree(root)  # an earlier or incomplete unpacking
        tree.rename(root)
    return root


def _run(command: list[str], where: Path, package: str, version: str) -> None:
    done = subprocess.run(command, cwd=where, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no message"])[-1]
        hint = " (run `apt-get update` first?)" if "Unable to locate" in done.stderr or "Can't find" in done.stderr else ""
        raise TextError(f"{' '.join(command[:2])} {package}={version} failed: {last}{hint}")
