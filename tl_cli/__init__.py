"""tl: transfer learning for image classifiers, from one command."""

__version__ = "0.1.0"

# Bumped when the checkpoint layout changes in a way older code cannot read.
CHECKPOINT_FORMAT = 1
