"""One comparison of two state dicts for the engine tests (training, resume, DDP replicas)."""

from __future__ import annotations

import torch


def max_state_diff(a: dict, b: dict, *, floats_only: bool = True) -> float:
    """Largest entry-wise ``|a - b|`` over the floating-point entries of two state dicts with the same keys and
    shapes; an empty buffer (e.g. an unfitted sampling prior) compares equal to an empty buffer. With
    ``floats_only=False`` every other entry counts 1.0 when it differs and 0.0 when it is equal."""
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    diffs = [0.0]
    for k in a:
        if a[k].is_floating_point():
            diffs.append((a[k].double() - b[k].double()).abs().max().item() if a[k].numel() else 0.0)
        elif not floats_only:
            diffs.append(float(not torch.equal(a[k], b[k])))
    return max(diffs)
