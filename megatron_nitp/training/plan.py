"""``--dry-run``: the plan of a job, checked without starting it (filled in by the cluster work)."""

from __future__ import annotations


def dry_run(args) -> int:
    """Prints the plan; returns the process exit code (0 = the job can start)."""
    raise NotImplementedError("--dry-run is not implemented yet")
