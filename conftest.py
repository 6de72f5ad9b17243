"""pytest setup shared by tests/ and the nbval-run notebooks: keep runs hermetic and quiet."""
import os

os.environ.setdefault("MPLBACKEND", "Agg")      # no display needed for plots
os.environ.setdefault("TQDM_DISABLE", "1")      # no progress-bar noise in test logs

# `jupyter nbconvert --execute` writes <name>.nbconvert.ipynb next to each notebook: a copy, not a lesson.
collect_ignore_glob = ["*.nbconvert.ipynb", "**/*.nbconvert.ipynb"]
