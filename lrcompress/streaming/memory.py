"""Memory of a streaming run: sizes given on the command line, the resident-set peak, and
the up-front estimate that ``--max-memory`` is checked against."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import ConfigError

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MB": 1 << 20,
          "MIB": 1 << 20, "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30, "T": 1 << 40, "TB": 1 << 40, "TIB": 1 << 40}


def parse_size(text: str, flag: str = "--max-memory") -> int:
    """Bytes of a size such as ``8G``, ``512MB`` or ``1.5GiB`` (binary units)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).upper() if m else None
    if m is None or unit not in _UNITS or float(m.group(1)) <= 0:
        raise ConfigError(f"{flag} {text!r} is not a size; give a positive number with a unit, e.g. {flag} 8G")
    return int(float(m.group(1)) * _UNITS[unit])


def fmt_size(n: float) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.0f} MiB"


def _status(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def peak_rss() -> int:
    """Peak resident set size of this process since the last ``reset_peak`` (bytes)."""
    hwm = _status("VmHWM")
    if hwm is not None:
        return hwm
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss() -> int:
    return _status("VmRSS") or peak_rss()


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter (Linux); False where it cannot be reset."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


@dataclass(frozen=True)
class Estimate:
    """What a streaming run holds at its peak, by part (bytes)."""

    resident: int      # weights outside the blocks (embeddings, norms, heads), compute dtype
    blocks: int        # the largest block twice: original and compressed copy
    statistics: int    # the largest unit's Gram matrices (float64)
    workspace: int     # factorization of the largest layer (float64)
    baseline: int      # the process before the run (interpreter, torch)
    activations: int   # activation streams kept in memory (the rest spills to disk)

    @property
    def fixed(self) -> int:
        return self.resident + self.blocks + self.statistics + self.workspace + self.baseline

    @property
    def total(self) -> int:
        return self.fixed + self.activations

    def describe(self) -> str:
        return (f"{fmt_size(self.fixed)} without activations (weights outside blocks {fmt_size(self.resident)}, "
                f"two copies of the largest block {fmt_size(self.blocks)}, statistics {fmt_size(self.statistics)}, "
                f"factorization {fmt_size(self.workspace)}, process {fmt_size(self.baseline)})")


def check_budget(est: Estimate, max_memory: int | None, activations_needed: int) -> int:
    """Bytes of activations to keep in memory under ``max_memory`` (the rest is memory-mapped
    from disk); refuses a limit below what the run needs without activations."""
    if max_memory is None:
        return activations_needed
    if est.fixed > max_memory:
        raise ConfigError(f"--max-memory {fmt_size(max_memory)} is below what streaming this model needs: "
                          f"{est.describe()}; raise --max-memory to at least {fmt_size(est.fixed * 1.1)}")
    return max(0, min(activations_needed, max_memory - est.fixed))
