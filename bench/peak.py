"""Run the rankfold CLI in this process and report its peak resident memory on the last line of
stderr, so the bench can record what a run needed:

    python -m bench.peak compress MODEL --calib C -o OUT ...   ->   ... PEAK_RSS_BYTES 734003200
"""

from __future__ import annotations

import resource
import sys

from rankfold.cli import main

PREFIX = "PEAK_RSS_BYTES "


def peak_rss_bytes() -> int:
    """This process's high-water resident memory. Not getrusage's ru_maxrss: Linux carries that
    across exec from the parent, so a child of a large process would report the parent's size."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def parse_peak(stderr: str) -> int | None:
    found = [line for line in stderr.splitlines() if line.startswith(PREFIX)]
    return int(found[-1][len(PREFIX):]) if found else None


if __name__ == "__main__":
    code = main(sys.argv[1:])
    print(f"{PREFIX}{peak_rss_bytes()}", file=sys.stderr)
    sys.exit(code)
