"""Run the rankfold CLI in this process and report its peak resident memory on the last line of
stderr, so the bench can record what a run needed:

    python -m bench.peak compress MODEL --calib C -o OUT ...   ->   ... PEAK_RSS_BYTES 734003200
"""

from __future__ import annotations

import sys

from rankfold.cli import main
from rankfold.host_memory import peak_resident_bytes

PREFIX = "PEAK_RSS_BYTES "


def parse_peak(stderr: str) -> int | None:
    found = [line for line in stderr.splitlines() if line.startswith(PREFIX)]
    return int(found[-1][len(PREFIX):]) if found else None


if __name__ == "__main__":
    code = main(sys.argv[1:])
    print(f"{PREFIX}{peak_resident_bytes()}", file=sys.stderr)
    sys.exit(code)
