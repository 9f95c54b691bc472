"""Helpers shared by the benchmark scripts (run as `python benchmarks/<script>.py`)."""

import os
import subprocess

import psgd_eqx


def lib_commit() -> str:
    """The git commit of the psgd_eqx checkout being measured (the library changes fast)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(psgd_eqx.__file__)))
    try:
        rev = subprocess.run(
            ["git", "-C", root, "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", root, "status", "--porcelain", "--", "psgd_eqx"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (rev or "unknown") + ("+dirty" if dirty else "")
