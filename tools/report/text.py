"""How the report writes numbers: short, and the same way in every section."""

from __future__ import annotations


def human(n) -> str:
    """1262720 -> 1.26M, 196608 -> 197k."""
    for scale, unit, digits in ((1e9, "B", 2), (1e6, "M", 2), (1e3, "k", 0)):
        if abs(n) >= scale:
            return f"{n / scale:.{digits}f}{unit}"
    return str(int(n))


def sci(x) -> str:
    """0.003 -> 3e-3."""
    mantissa, exponent = f"{x:e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def plus_minus(mean, std, digits) -> str:
    """``mean ± std``, or ``-`` where there is no value."""
    if mean is None:
        return "-"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def span(values, fmt) -> str:
    """The range of ``values`` as ``lo–hi``, or one value where both print the same."""
    lo, hi = min(values), max(values)
    return format(lo, fmt) if format(lo, fmt) == format(hi, fmt) else \
        f"{format(lo, fmt)}–{format(hi, fmt)}"


def signed(values, digits) -> str:
    """Per-seed differences: ``+0.11, -0.02``."""
    return ", ".join(f"{x:+.{digits}f}" for x in values)
