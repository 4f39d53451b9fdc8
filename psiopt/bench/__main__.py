"""``python -m psiopt.bench``: the same as ``psiopt bench``."""

import sys

from psiopt.cli import bench_main

if __name__ == "__main__":
    sys.exit(bench_main())
