"""argparse types for the commands' numeric flags, shared by every command.

A value out of range is refused while the arguments are parsed, before anything loads: argparse
reports it as one line, `argument --FLAG: VALUE ...; use ...` (exit 2 through the CLI's parser).
"""
from __future__ import annotations

import argparse
import math


def int_at_least(low: int):
    """An integer >= low."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer; use an integer >= {low}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is out of range; use an integer >= {low}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def float_in(low: float, high: float = math.inf, *, low_open: bool = False):
    """A finite float in [low, high] (or (low, high] with low_open)."""
    shown = f"{'(' if low_open else '['}{low:g}, {high:g}]" if high != math.inf else None
    wanted = f"a number in {shown}" if shown else f"a number {'>' if low_open else '>='} {low:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number; use {wanted}") from None
        if not math.isfinite(value) or value < low or (low_open and value == low) or value > high:
            raise argparse.ArgumentTypeError(f"{text} is out of range; use {wanted}")
        return value

    parse.__name__ = wanted
    return parse


def int_list_at_least(low: int):
    """Comma-separated integers, each >= low (e.g. bench's prompt lengths 32,512)."""
    one = int_at_least(low)

    def parse(text: str) -> list[int]:
        try:
            return [one(x.strip()) for x in str(text).split(",")]
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"{text!r} is out of range; use comma-separated integers >= {low}, "
                                             "like 32,512") from None

    parse.__name__ = f"integers >= {low}"
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)
