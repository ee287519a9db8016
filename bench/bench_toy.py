"""``python bench/bench_toy.py`` still works: the toy benchmark is ``python -m toy2d.bench``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from toy2d.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
