"""What software a process runs, so that every node of a run can be held to the driver's.

An autoscaler adds nodes for days after a run started; a node that installed a newer torch, another Ray, or another
commit of this package trains with other numerics or pickles another actor protocol, and nothing would say so. The
driver takes ``software_fingerprint()`` once; each Train worker and eval actor compares its own with
``check_same_software`` before it does any work, and refuses in one line naming the package and both versions.
"""

from __future__ import annotations

import hashlib
import platform
import socket
from importlib import metadata
from pathlib import Path

# the distributions whose version changes results or the wire protocol between the driver and its actors
PINNED = ("ray", "torch", "torchvision", "numpy", "pyarrow", "clean-fid", "scipy", "pillow")
PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # hdebm_ray/


class SoftwareMismatch(RuntimeError):
    """This node runs other software than the run's driver."""


def code_digest(root: Path = PACKAGE_ROOT) -> str:
    """sha256 (first 16 hex digits) over this package's sources and presets: the same commit gives the same digest
    whether it was pip-installed, baked into an image or uploaded as a job's working directory."""
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".yaml") and "__pycache__" not in p.parts):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def software_fingerprint() -> dict[str, str]:
    """{"python": "3.11", "hdebm_ray": <code digest>, <each PINNED distribution>: <version>}."""
    return {
        "python": ".".join(platform.python_version_tuple()[:2]),
        "hdebm_ray": code_digest(),
        **{dist: _version(dist) for dist in PINNED},
    }


def check_same_software(expected: dict[str, str], what: str = "a worker") -> None:
    """``SoftwareMismatch`` (one line: the first differing item, both values, what to do) where this process's
    fingerprint differs from the driver's ``expected``."""
    mine = software_fingerprint()
    for key, want in expected.items():
        if mine.get(key) != want:
            label = "code (a digest of hdebm_ray's sources)" if key == "hdebm_ray" else key
            raise SoftwareMismatch(
                f"{what} on node {socket.gethostname()} runs {label} {mine.get(key)} where the run's driver runs "
                f"{want}: every node must run the driver's commit and versions (cluster/constraints.txt and a "
                "pinned commit in the launcher configs, or one image for every KubeRay pod)"
            )
