import os
import sys

# libgomp reads this when torch loads. Passive waiting keeps idle OpenMP threads from spinning through their time
# slice; on a shared CPU, spinning made every small kernel cost a scheduler tick (RESULTS.md, optimisation 1).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .cli import main  # noqa: E402

sys.exit(main())
