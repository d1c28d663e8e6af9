"""`python -m pipeline.tune`: the same as the `mnist-tune` command."""

from pipeline.tune.command import run

run()
