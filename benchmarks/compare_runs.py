"""Compare two run folders record by record, timings and paths aside.

    python -m benchmarks.compare_runs RUN_A RUN_B

Prints one line per run (records compared, differences) and exits 1 on any difference.
Used to show that a refactor leaves a scenario's records bit-identical.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

# Wall-clock figures and where things were written differ between any two runs.
IGNORED = {"seconds", "discovery_s", "elapsed_s", "artifact"}


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


def records(run: Path) -> list[dict[str, Any]]:
    lines = (run / "results.jsonl").read_text().splitlines()
    return [_clean(_trace_without_time(json.loads(line))) for line in lines if line.strip()]


def artifacts(run: Path) -> dict[str, dict[str, np.ndarray]]:
    found = {}
    for path in sorted((run / "artifacts").glob("*.npz")):
        with np.load(path) as arrays:
            found[path.name] = {k: np.array(arrays[k]) for k in arrays.files}
    return found


def compare(first: Path, second: Path) -> list[str]:
    a, b = records(first), records(second)
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
    first, second = map(Path, sys.argv[1:3])
    problems = compare(first, second)
    count = len(records(first))
    status = "identical" if not problems else f"{len(problems)} differences"
    print(f"{first.name}: {count} records, {len(artifacts(first))} artifacts: {status}")
    for problem in problems[:20]:
        print(f"  {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
