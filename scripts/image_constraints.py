"""Print the constraints the image installs with: the official Airflow ones minus our pins.

The official image was built on `constraints-<airflow>/constraints-<python>.txt`; installing this
project's requirements on the same constraints keeps the image's own packages where they are.
Where requirements.txt pins a package itself, its pin wins and the official line is dropped
(pip refuses two different pins of one package).

    python scripts/image_constraints.py OFFICIAL_CONSTRAINTS REQUIREMENTS > image-constraints.txt
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable
from pathlib import Path

PIN = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?\s*==")


def canonical(name: str) -> str:
    """Return a distribution name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned_names(lines: Iterable[str]) -> set[str]:
    """Return the canonical names of the `name==version` lines."""
    return {canonical(m.group(1)) for line in lines if (m := PIN.match(line))}


def merged(official: Iterable[str], requirements: Iterable[str]) -> list[str]:
    """Return the official constraint lines whose package the requirements do not pin."""
    own = pinned_names(requirements)
    kept = []
    for line in official:
        match = PIN.match(line)
        if match and canonical(match.group(1)) not in own:
            kept.append(line.strip())
    return kept


def main(argv: list[str]) -> int:
    """Print the merged constraints of the two files named in `argv`."""
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    official, requirements = (Path(a).read_text().splitlines() for a in argv)
    print("\n".join(merged(official, requirements)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
