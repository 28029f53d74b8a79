"""The command line: the ``tl`` entry point (`main`), tl's own commands (`commands`), the
LightningCLI for fit/validate/test/predict (`lightning_cli`), the Trainer it builds (`trainer`),
run folders (`runs`) and `tl compare` (`compare`)."""
