"""``python bench/bench_toy.py`` still works: the toy benchmark is ``python -m toy2d.bench``."""

import sys

from toy2d.bench import main

if __name__ == "__main__":
    sys.exit(main())
