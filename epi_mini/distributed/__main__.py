"""``torchrun --standalone --nproc_per_node=N -m epi_mini.distributed [python -m epi_mini options]``."""
import sys

from .launch import main

sys.exit(main())
