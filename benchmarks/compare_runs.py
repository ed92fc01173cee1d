"""Compare two run folders record by record, timings and paths aside.

    python -m benchmarks.compare_runs RUN_A RUN_B [--read]

Prints one line per run (records compared, differences) and exits 1 on any difference.
Used to show that a refactor leaves a scenario's records bit-identical. ``--read`` compares
the records as :func:`simulator.core.records.read` types them, so that a folder written in an
older format (renamed fields) is compared as today's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from simulator.core.records import read

# Wall-clock figures and where things were written differ between any two runs.
IGNORED = {"seconds", "seconds_to_threshold", "discovery_s", "elapsed_s", "artifact"}


def _clean(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items() if k not in IGNORED}
    if isinstance(value, list):
        if value and all(isinstance(v, dict) for v in value):
            return [_clean(v) for v in value]
        return [_clean(v) for v in value]
    return value


def _trace_without_time(record: dict[str, Any]) -> dict[str, Any]:
    if "trace" in record:
        trace = [{k: v for k, v in step.items() if k != "seconds"} for step in record["trace"]]
        record = {**record, "trace": trace}
    return record


def records(run: Path, typed: bool = False) -> list[dict[str, Any]]:
    """The records of a run, timings aside (``typed``: as today's format writes them)."""
    text = (run / "results.jsonl").read_text().splitlines()
    lines = [json.loads(line) for line in text if line.strip()]
    if typed:  # through JSON again, as written: NaN as null, tuples as lists
        lines = [json.loads(json.dumps(read(line).to_dict())) for line in lines]
    return [_clean(_trace_without_time(line)) for line in lines]


def artifacts(run: Path) -> dict[str, dict[str, np.ndarray]]:
    found = {}
    for path in sorted((run / "artifacts").glob("*.npz")):
        with np.load(path) as arrays:
            found[path.name] = {k: np.array(arrays[k]) for k in arrays.files}
    return found


def compare(first: Path, second: Path, typed: bool = False) -> list[str]:
    a, b = records(first, typed), records(second, typed)
    problems = []
    if len(a) != len(b):
        problems.append(f"{len(a)} records against {len(b)}")
    for index, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            keys = sorted(k for k in set(x) | set(y) if x.get(k) != y.get(k))
            problems.append(f"record {index} ({x.get('kind')}): {keys}")
    arrays_a, arrays_b = artifacts(first), artifacts(second)
    if sorted(arrays_a) != sorted(arrays_b):
        problems.append(f"artifact files differ: {sorted(arrays_a)} / {sorted(arrays_b)}")
    for name in sorted(set(arrays_a) & set(arrays_b)):
        for key in sorted(set(arrays_a[name]) | set(arrays_b[name])):
            left, right = arrays_a[name].get(key), arrays_b[name].get(key)
            if left is None or right is None or not np.array_equal(left, right):
                problems.append(f"artifact {name}: array {key!r} differs")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description="Compare two run folders record by record.")
    parser.add_argument("first", type=Path, help="a run folder")
    parser.add_argument("second", type=Path, help="the run folder to compare it with")
    parser.add_argument("--read", action="store_true", help="compare records as read() types them")
    args = parser.parse_args()
    for folder in (args.first, args.second):
        if not (folder / "results.jsonl").is_file():
            parser.error(f"{folder}: not a run folder (no results.jsonl)")
    first, second = args.first, args.second
    problems = compare(first, second, args.read)
    count = len(records(first))
    status = "identical" if not problems else f"{len(problems)} differences"
    print(f"{first.name}: {count} records, {len(artifacts(first))} artifacts: {status}")
    for problem in problems[:20]:
        print(f"  {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
