#!/usr/bin/env python3
"""selfloop: a population of randomly initialized learned optimizers trains itself.

python run.py                      # train with the default config, or resume the run in checkpoints/default
python run.py --config configs/paper.toml --max-minutes 600
"""

from selfloop.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
