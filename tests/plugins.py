"""User code that tests name in configs (importable as vlgrpo.tests.plugins inside Ray workers)."""
from __future__ import annotations


def flaky_reward(completions, samples, **kwargs):
    """Raises on every sample whose completion contains the letter 'e' (a user reward with a bug)."""
    out = []
    for c in completions:
        if "e" in c:
            raise RuntimeError("user reward bug")
        out.append(1.0)
    return out


def char_variety(completions, samples, **kwargs):
    """A dense reward that differs between almost any two completions (distinct characters / 10):
    tests use it so that every GRPO group has non-zero advantages from the first step."""
    return [len(set(c)) / 10.0 for c in completions]


def length_parity(completions, samples, **kwargs):
    """1 for a completion of odd length, else 0: a coarse reward, so that some groups have no spread."""
    return [float(len(c) % 2) for c in completions]
