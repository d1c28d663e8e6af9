"""The search space: what a study varies and what it holds, read from `recipes/search_space.yaml` and
`--set`, and checked against params.yaml's schema before any trial, with params.yaml's one-line errors."""

from __future__ import annotations

import contextlib
import difflib
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from pipeline import recipe
from pipeline.config import SEARCH_SPACE_FILE, Params, read_yaml
from pipeline.errors import ConfigError

if TYPE_CHECKING:
    import optuna
    from optuna.distributions import BaseDistribution

SET_SOURCE = Path("--set")  # how errors in --set values name their source
TUNABLE_SECTIONS = ("model", "train")  # data.* and download.* shape the prepared data, not a trial
DISTRIBUTION_KEYS = ("low", "high", "log", "step", "choices")


@dataclass(frozen=True)
class SearchSpace:
    """What a study varies (`distributions`; choices that are lists are held by Optuna as their JSON
    text) and holds (`fixed`: the file's fixed values and `--set`)."""

    distributions: dict[str, BaseDistribution]
    fixed: dict[str, Any]

    def definition(self) -> dict[str, Any]:
        """A JSON-able description, kept with the study to notice when it resumes with another one."""
        from optuna.distributions import distribution_to_json

        return {
            "space": {key: json.loads(distribution_to_json(d)) for key, d in self.distributions.items()},
            "fixed": self.fixed,
        }


def describe(d: BaseDistribution) -> str:
    """`float in [0.0005, 0.01], log` / `one of [128, 256]`: a distribution in words, for the parent
    run's parameters and messages; list choices (held as JSON text) shown as the lists they are."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if isinstance(d, CategoricalDistribution):
        return f"one of {[_decoded(choice) for choice in d.choices]}"
    assert isinstance(d, (FloatDistribution, IntDistribution))
    kind = "float" if isinstance(d, FloatDistribution) else "int"
    extras = (", log" if d.log else "") + (f", step {d.step}" if d.step not in (None, 1) else "")
    return f"{kind} in [{d.low}, {d.high}]{extras}"


def _decoded(choice: Any) -> Any:
    """A choice as the value it stands for: list choices are held as JSON text (the schema refuses a
    text starting with '[' or '{' for every tunable key)."""
    if isinstance(choice, str) and choice.startswith(("[", "{")):
        with contextlib.suppress(ValueError):
            return json.loads(choice)
    return choice


def _check_names(names: Iterable[Any], allowed: Sequence[str], unknown: str) -> None:
    """Each of `names` is one of `allowed`; else `<unknown> '<name>'` in one sentence, with the closest
    allowed name or the list of them."""
    for name in names:
        if name not in allowed:
            close = difflib.get_close_matches(str(name), allowed, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"allowed: {', '.join(allowed)}."
            raise ConfigError(f"{unknown} '{name}'; {hint}")


def _check_key(key: Any, base: Params, file: Path, where: str) -> None:
    """A `section.key` of params.yaml that a trial may vary; else one sentence with a suggestion."""
    known = list(base.flat())
    place = f" in {where}" if where else ""
    if not isinstance(key, str) or key not in known:
        leaf = str(key).rpartition(".")[2]  # train.dropout -> model.dropout: the name is right, the section not
        close = [k for k in known if k.rpartition(".")[2] == leaf] or difflib.get_close_matches(str(key), known, n=1)
        hint = f"did you mean '{close[0]}'?" if close else "keys are params.yaml's, written section.key (train.epochs)."
        raise ConfigError(f"{file}: unknown key '{key}'{place}; {hint}")
    if key.partition(".")[0] not in TUNABLE_SECTIONS:
        allowed = " and ".join(f"{section}.*" for section in TUNABLE_SECTIONS)
        raise ConfigError(
            f"{file}: {key}{place} cannot vary per trial: trials train on the data that `dvc repro prepare` made; "
            f"only {allowed} keys can."
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _check_value(context: Params, key: str, role: str, value: Any, file: Path) -> None:
    """`value` as `key` over `context` must pass params.yaml's schema; the error names the role."""
    try:
        recipe.apply(context, {key: value}, file)
    except ConfigError as error:
        text = str(error).removeprefix(f"{file}: ")
        plain = f"{key} = {value!r} is not allowed: "
        if text.startswith(plain):
            raise ConfigError(f"{file}: space {key}: {role} {value!r} is not allowed: {text[len(plain) :]}") from None
        raise ConfigError(f"{file}: space {key}: {role} {value!r} breaks a rule of params.yaml: {text}") from None


def _distribution(key: str, spec: Any, context: Params, file: Path) -> BaseDistribution:
    """The Optuna distribution of one entry of `space:`, checked."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    where = f"{file}: space {key}"
    if not isinstance(spec, dict) or not spec:
        raise ConfigError(
            f"{where} = {spec!r} is not a distribution; write {{low: L, high: H}} (log: true, step: S optional) "
            "or {choices: [A, B, ...]}."
        )
    _check_names(spec, DISTRIBUTION_KEYS, f"{where}: unknown field")
    if "choices" in spec:
        if extra := [name for name in spec if name != "choices"]:
            raise ConfigError(f"{where}: choices cannot be combined with {', '.join(extra)}; use one or the other.")
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}: choices = {choices!r} must be a non-empty list of values, e.g. [128, 256].")
        if len({json.dumps(c, sort_keys=True) for c in choices}) < len(choices):
            raise ConfigError(f"{where}: choices = {choices!r} lists a value twice; list each value once.")
        for choice in choices:
            _check_value(context, key, "choice", choice, file)
        return CategoricalDistribution([json.dumps(c) if isinstance(c, (list, dict)) else c for c in choices])
    if "low" not in spec or "high" not in spec:
        raise ConfigError(f"{where}: give both low and high (or choices); got {spec!r}.")
    low, high, log, step = spec["low"], spec["high"], spec.get("log", False), spec.get("step")
    for role, value in (("low", low), ("high", high)):
        if not _is_number(value):
            raise ConfigError(f"{where}: {role} = {value!r} is not allowed: it must be a number.")
    if not low < high:
        raise ConfigError(f"{where}: low = {low!r} must be below high = {high!r}; for one value use fixed: instead.")
    if not isinstance(log, bool):
        raise ConfigError(f"{where}: log = {log!r} is not allowed: it must be true or false.")
    if log and low <= 0:
        raise ConfigError(f"{where}: low = {low!r} is not allowed with log: true; a log scale needs low > 0.")
    # the schema's float keys hold floats whatever was written (0 in params.yaml is 0.0)
    integer = _is_int(low) and _is_int(high) and not isinstance(context.flat()[key], float)
    if step is not None:
        if log:
            raise ConfigError(f"{where}: step = {step!r} cannot be combined with log: true; drop one of them.")
        if not (_is_int(step) if integer else _is_number(step)) or step <= 0:
            kind = "a positive integer (low and high are integers)" if integer else "a positive number"
            raise ConfigError(f"{where}: step = {step!r} is not allowed: it must be {kind}.")
        if integer and (high - low) % step:
            raise ConfigError(f"{where}: high - low = {high - low} is not a multiple of step = {step}; adjust high.")
    _check_value(context, key, "low", low, file)
    _check_value(context, key, "high", high, file)
    if integer:
        return IntDistribution(low, high, log=log, step=step or 1)
    return FloatDistribution(float(low), float(high), log=log, step=None if step is None else float(step))


def parse_set(values: Sequence[str], base: Params) -> dict[str, Any]:
    """`--set section.key=value` options: values read as YAML, as `dvc exp run -S` reads them."""
    pinned: dict[str, Any] = {}
    for option in values:
        key, equals, text = option.partition("=")
        if not equals or not key:
            raise ConfigError(f"{SET_SOURCE} {option!r}: expected section.key=value, e.g. --set train.epochs=20.")
        _check_key(key, base, SET_SOURCE, "")
        try:
            pinned[key] = yaml.safe_load(text)
        except yaml.YAMLError as error:
            reason = str(getattr(error, "problem", None) or error)
            raise ConfigError(f"{SET_SOURCE} {key}={text}: the value is not valid YAML ({reason}).") from None
    return pinned


_KEY = re.compile(r"\b(?:download|data|model|train)\.[a-z_]+\b")  # a params.yaml key named in a message


def _applied(base: Params, overrides: dict[str, Any], where: Path, sources: dict[str, str]) -> Params:
    """`recipe.apply`; when a rule across keys breaks and their values came from different places (the
    space file's fixed:, --set, params.yaml), the message says where each came from and how to fix it."""
    try:
        return recipe.apply(base, overrides, where)
    except ConfigError as error:
        message = str(error).rstrip(".")
        flat = base.flat() | overrides
        keys = [key for key in dict.fromkeys(_KEY.findall(message)) if key in flat]
        origin = {key: sources.get(key, "params.yaml") for key in keys}
        if len(set(origin.values())) < 2:
            raise
        came = ", ".join(
            f"{key} = {value if isinstance(value := flat[key], str) else json.dumps(value)} "
            f"{'is ' if i == 0 else ''}from {origin[key]}"
            for i, key in enumerate(keys)
        )
        if str(SET_SOURCE) in origin.values():  # the other key can be pinned too
            other = next(key for key in keys if origin[key] != str(SET_SOURCE))
            fix = f"pin {other} with --set as well, or change it in {origin[other]}"
        else:  # the space file's fixed: against params.yaml
            other = next(key for key in keys if origin[key] == "params.yaml")
            fix = f"hold {other} in fixed: as well, or change it in params.yaml"
        raise ConfigError(f"{message} ({came}): {fix}.") from None


def read_space(file: Path, base: Params, pinned: dict[str, Any]) -> SearchSpace:
    """The search space file, checked against params.yaml's schema; `pinned` (--set) overrides it."""
    document = read_yaml(file, f"; pass --space FILE, or restore {SEARCH_SPACE_FILE} with git.")
    document = {} if document is None else document
    if not isinstance(document, dict):
        raise ConfigError(f"{file}: expected the sections space: and fixed:, got {type(document).__name__}.")
    _check_names(document, ("space", "fixed"), f"{file}: unknown section")
    space, fixed = document.get("space") or {}, document.get("fixed") or {}
    for name, section in (("space", space), ("fixed", fixed)):
        if not isinstance(section, dict):
            raise ConfigError(f"{file}: {name}: must map section.key names to values, got {section!r}.")
        for key in section:
            _check_key(key, base, file, name)
    if both := sorted(set(space) & set(fixed)):
        raise ConfigError(f"{file}: {both[0]} is both in space: and in fixed:; keep it in one of them.")
    sources = dict.fromkeys(fixed, f"fixed: in {file}") | dict.fromkeys(pinned, str(SET_SOURCE))
    fixed_params = _applied(base, fixed, file, sources)
    context = _applied(fixed_params, pinned, SET_SOURCE, sources)
    searched = {key: spec for key, spec in space.items() if key not in pinned}
    if not searched:
        raise ConfigError(f"{file}: space: names no key to search (or --set pins them all); add one.")
    distributions = {key: _distribution(key, spec, context, file) for key, spec in searched.items()}
    return SearchSpace(distributions, {**fixed, **pinned})


def trial_params(base: Params, space: SearchSpace, trial: optuna.Trial) -> Params:
    """params.yaml with the study's fixed values and the trial's sampled ones; a combination the schema
    refuses (rules across keys) fails the trial with the schema's sentence."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    values = dict(space.fixed)
    for key, d in space.distributions.items():
        if isinstance(d, CategoricalDistribution):
            values[key] = _decoded(trial.suggest_categorical(key, d.choices))
        elif isinstance(d, FloatDistribution):
            values[key] = trial.suggest_float(key, d.low, d.high, log=d.log, step=d.step)
        else:
            assert isinstance(d, IntDistribution)
            values[key] = trial.suggest_int(key, d.low, d.high, log=d.log, step=d.step)
    return recipe.apply(base, values, Path(f"trial {trial.number}"))


def differences(base: Params, flat: dict[str, Any]) -> dict[str, Any]:
    """The values of `flat` that differ from params.yaml, in params.yaml's order."""
    return {key: flat[key] for key, value in base.flat().items() if key in flat and flat[key] != value}
