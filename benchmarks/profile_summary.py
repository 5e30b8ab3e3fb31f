"""Hot spots in py-spy's raw (collapsed) stacks: each function's share of the CPU samples.

    .venv/bin/python -m benchmarks.profile_summary PROFILE.txt [--top 15] [--match services/]
        [--group relay=nats/relay.py --group projections=projection_runner.py,read_model ...]

``benchmarks.vs_dbos --profile DIR`` writes one such file per process. "self" counts the
samples where the function itself was running; "total" those where it was on the stack;
``--group`` sorts each sample under the first label one of whose patterns is on its stack.
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Profile:
    samples: int
    own: Counter[str]
    """Samples with the function on top of the stack."""
    total: Counter[str]
    """Samples with the function anywhere on the stack (counted once per stack)."""

    def share(self, count: int) -> float:
        return count / self.samples if self.samples else 0.0


def parse(lines: Iterable[str]) -> Profile:
    """Read ``frame;frame;...;frame COUNT`` lines (outermost frame first)."""
    samples, own, total = 0, Counter[str](), Counter[str]()
    for line in lines:
        stack, _, count_text = line.rstrip("\n").rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        samples += count
        own[frames[-1]] += count
        for frame in set(frames):
            total[frame] += count
    return Profile(samples, own, total)


def group(lines: Iterable[str], rules: list[tuple[str, list[str]]]) -> Counter[str]:
    """Samples by the first rule ``(label, patterns)`` with a pattern in the stack; "other"."""
    found = Counter[str]()
    for line in lines:
        stack, _, count_text = line.rstrip("\n").rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        label = next(
            (label for label, patterns in rules if any(p in stack for p in patterns)), "other"
        )
        found[label] += int(count_text)
    return found


def top(counts: Counter[str], n: int, match: str = "") -> list[tuple[str, int]]:
    """The ``n`` largest counts among the frames whose text contains ``match``."""
    return [(f, c) for f, c in counts.most_common() if match in f][:n]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--match", default="", help="only frames containing this, e.g. services/")
    parser.add_argument("--group", action="append", default=[], help="LABEL=PATTERN[,PATTERN]")
    args = parser.parse_args()
    rules = [(g.split("=", 1)[0], g.split("=", 1)[1].split(",")) for g in args.group]
    for path in args.files:
        lines = path.read_text().splitlines()
        profile = parse(lines)
        print(f"{path}: {profile.samples} samples")
        if rules:
            print("  by group:")
            for label, count in group(lines, rules).most_common():
                print(f"    {profile.share(count):6.1%}  {label}")
        for title, counts in (("self", profile.own), ("total", profile.total)):
            print(f"  by {title}:")
            for frame, count in top(counts, args.top, args.match):
                print(f"    {profile.share(count):6.1%}  {frame}")


if __name__ == "__main__":
    main()
