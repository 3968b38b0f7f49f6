"""Both recaption figures in one run (issue 3): the transformers backend batched against one
image at a time, and the openai backend's achieved throughput over C/L against a loopback
server. Each part is a script of its own with its options; this runs both with defaults.

    python bench/recaption.py
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

if __name__ == "__main__":
    for script in ("recaption_transformers.py", "recaption_openai.py"):
        subprocess.run([sys.executable, str(HERE / script), *sys.argv[1:]], check=True)
