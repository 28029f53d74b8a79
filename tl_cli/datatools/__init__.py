"""The ``tl data`` commands: `check` (find bad images), `split` (train/val/test folders from one
pool), `synth` (the generated demo dataset)."""
