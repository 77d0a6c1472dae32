"""User code the fault tests name in configs (importable as vlgrpo.tests.faults.plugins in Ray workers)."""
from __future__ import annotations


def flaky_reward(completions, samples, **kwargs):
    """Raises on every sample whose completion contains the letter 'e' (a user reward with a bug)."""
    out = []
    for c in completions:
        if "e" in c:
            raise RuntimeError("user reward bug")
        out.append(1.0)
    return out
