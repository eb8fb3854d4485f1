"""The RunPod Hub's entry file: the Hub looks for a handler.py in .runpod/ or the repository root.

The worker itself is the `worker` package; the image runs `python -m worker.handler` (Dockerfile CMD), and
this file starts the same thing when run from a checkout (`python .runpod/handler.py --test_input ...`).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker.handler import main  # the repository root must be on the path first

if __name__ == "__main__":
    main()
