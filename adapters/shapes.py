"""Shape buckets: round a size up to a power of two between a floor and a cap.

Few distinct sizes mean few compiled graphs; the rounding costs only masked-out or zero work.
Used for attention windows and decode rows (server/runner.py) and LoRA rank windows
(adapters/slot_bank.py).
"""

from __future__ import annotations


def power_of_two_bucket(needed: int, *, floor: int = 1, cap: int) -> int:
    """The smallest power of two >= needed and >= floor, but at most cap."""
    bucket = 1 << max(0, (needed - 1).bit_length())
    return min(cap, max(floor, bucket))
