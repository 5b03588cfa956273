"""How long `automodel-convert --help` takes to start, beside its anchors measured in the same run.

Anchors: a bare `python -c pass` (the floor) and `python -c "import torch"` (what the CLI would cost if it
imported torch at start). Prints the best of `--repeat` runs of each, in seconds.

    python bench/cli_start.py --repeat 5
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

CASES = {
    "python -c pass (floor)": "pass",
    "automodel-convert --help": "from automodel_convert.cli import main; main(['--help'])",
    "python -c 'import torch' (anchor)": "import torch",
}


def best_wall(code: str, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    walls = {name: best_wall(code, args.repeat) for name, code in CASES.items()}
    for name, wall in walls.items():
        print(f"{name:36s} {wall:6.3f} s")
    cli, torch_import = walls["automodel-convert --help"], walls["python -c 'import torch' (anchor)"]
    print(f"CLI start is {cli / torch_import:.2f}x the time of importing torch alone")


if __name__ == "__main__":
    main()
