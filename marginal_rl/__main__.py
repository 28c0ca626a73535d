"""`python -m marginal_rl ...` is `marginal-rl ...` (and what `accelerate launch -m marginal_rl train` runs)."""

import sys

from marginal_rl.cli import main

sys.exit(main())
