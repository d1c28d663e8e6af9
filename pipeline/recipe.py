"""Command `mnist-recipe FILE [DVC EXP RUN OPTIONS]`: train a committed recipe as a DVC experiment.

A recipe is a partial params.yaml (recipes/*.yaml): the values that differ from the tutorial's. The
command checks it against the schema, merged over params.yaml, prints the `dvc exp run -S ...` command
that applies it and runs that command, so the result shows in `dvc exp show` and as an MLflow run named
after the recipe. `mnist-tune` prints the same form of command for the best trial it found.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

from pipeline.cli import ArgumentParser
from pipeline.config import PARAMS_FILE, Params, flatten, load_params, read_yaml, validate_params
from pipeline.errors import ConfigError, PipelineError, run_stage


def read_overrides(file: Path) -> dict[str, Any]:
    """The recipe's values as `section.key -> value`, checked against the schema over params.yaml."""
    document = read_yaml(file, "; recipes live in recipes/ (e.g. recipes/tuned.yaml).")
    if not isinstance(document, dict) or not all(isinstance(values, dict) for values in document.values()):
        raise ConfigError(f"{file}: expected sections of params.yaml (model:, train:, ...) holding keys and values.")
    flat = flatten(document)
    apply(load_params(), flat, file)
    return flat


def apply(base: Params, overrides: dict[str, Any], file: Path) -> Params:
    """`base` with `section.key` values replaced, validated; errors name `file` and the key."""
    document = base.model_dump()
    for dotted, value in overrides.items():
        section, _, key = dotted.partition(".")
        if section not in document:
            raise ConfigError(f"{file}: unknown section '{section}'; allowed: {', '.join(document)}.")
        document[section][key] = value
    return validate_params(document, file)


def yaml_value(value: Any) -> str:
    """A value as DVC's `-S` parses it (YAML); floats without exponents, which YAML 1.1 reads as strings."""
    if isinstance(value, float):
        return format(Decimal(repr(value)), "f")
    return json.dumps(value)


def exp_run_command(overrides: dict[str, Any], name: str | None = None) -> list[str]:
    """The `dvc exp run` command that trains params.yaml with `overrides` as a DVC experiment."""
    command = ["dvc", "exp", "run", *(["-n", name] if name else [])]
    for key, value in overrides.items():
        command += ["-S", f"{key}={yaml_value(value)}"]
    return command


def main(argv: Sequence[str]) -> None:
    """Validate the recipe, print the command, run it."""
    parser = ArgumentParser(
        prog="mnist-recipe",
        usage="mnist-recipe RECIPE.yaml [dvc exp run options], e.g. mnist-recipe recipes/tuned.yaml",
        description="Train a recipe (a partial params.yaml) as a DVC experiment.",
    )
    parser.add_argument("recipe", type=Path, help="a partial params.yaml, e.g. recipes/tuned.yaml")
    if not argv or argv[0].startswith("-"):  # what follows the recipe belongs to `dvc exp run`
        parser.parse_args(argv[:1] if argv and argv[0] in ("-h", "--help") else [])
    file, options = Path(argv[0]), list(argv[1:])
    if not PARAMS_FILE.is_file():
        raise ConfigError(f"{PARAMS_FILE} not found; run mnist-recipe from the repository root.")
    command = exp_run_command(read_overrides(file), name=None if "-n" in options else file.stem) + options
    print("+ " + shlex.join(command), file=sys.stderr, flush=True)
    try:
        code = subprocess.call(command)
    except FileNotFoundError:
        raise PipelineError("`dvc` is not on PATH; activate the project's virtual environment.") from None
    if code:
        sys.exit(code)


def run() -> None:
    """The console script."""
    run_stage(lambda: main(sys.argv[1:]))


if __name__ == "__main__":
    run()
