"""Per-sample seeds: sample i of prompt p under run seed s is always the same draw.

`sample_seed(s, p, i)` hashes the three integers (SHA-256) into a 63-bit seed for the
row's own `torch.Generator`. Rows never share a generator, so a sample is the same
whether it runs alone or among 32 others, and the seed stored with it redoes it.
"""

from __future__ import annotations

import hashlib
import secrets

import torch


def sample_seed(run_seed: int, prompt_index: int, sample_index: int) -> int:
    digest = hashlib.sha256(f"muestra:{run_seed}:{prompt_index}:{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


def fresh_run_seed() -> int:
    """A random run seed for callers that gave none (it is still recorded)."""
    return secrets.randbits(31)


def generator_for(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)
