"""Run every benchmarks/bench_*.py in turn (small CPU defaults); extra args go to each script.

python benchmarks/run.py              # all
python benchmarks/run.py ddm cdm      # only bench_ddm.py and bench_cdm.py
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    here = Path(__file__).parent
    wanted = [a for a in argv if not a.startswith("-")]
    extra = [a for a in argv if a.startswith("-")]
    scripts = sorted(here.glob("bench_*.py"))
    if wanted:
        scripts = [s for s in scripts if s.stem.removeprefix("bench_") in wanted]
    failed = []
    for script in scripts:
        print(f"\n=== {script.name} ===", flush=True)
        if subprocess.call([sys.executable, str(script), *extra]) != 0:
            failed.append(script.name)
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
