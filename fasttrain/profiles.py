"""Run profiles: `smoke` (CPU, small, what CI runs), `full` (GPU, the real targets), `auto`."""

from __future__ import annotations

import torch

PROFILES = ("smoke", "full")


def resolve_profile(profile: str, device: torch.device | str | None = None) -> str:
    """Map "auto" to "full" on CUDA and "smoke" elsewhere; reject unknown names with a clear error."""
    if profile == "auto":
        if device is None:
            return "full" if torch.cuda.is_available() else "smoke"
        return "full" if torch.device(device).type == "cuda" else "smoke"
    if profile not in PROFILES:
        raise ValueError(
            f"Unknown profile {profile!r}: use 'smoke' (small, CPU, minutes), 'full' (GPU, the real "
            f"targets) or 'auto' (full on CUDA, smoke elsewhere)."
        )
    return profile


def pick(profile: str, **by_profile):
    """Choose a setting by profile: `pick(profile, smoke=200, full=50_000)`."""
    if profile not in by_profile:
        raise KeyError(f"No value given for profile {profile!r} (have {sorted(by_profile)})")
    return by_profile[profile]
