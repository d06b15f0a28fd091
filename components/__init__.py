"""kfp v2 components, one per stage: typed inputs/outputs and a few lines that call scalekd.

Every component runs in the project's image (IMAGE); nothing is pip-installed at run time.
"""

import os

# The one place the image tag lives; override at compile time with SCALEKD_IMAGE.
IMAGE = os.environ.get("SCALEKD_IMAGE", "ghcr.io/scalekd/scalekd:0.1.0")
