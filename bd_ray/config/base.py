"""The config machinery every bd-ray config shares: strict models, field errors, YAML loading and overrides.

YAML in, validated pydantic models out. Every model forbids unknown keys, so a typo is an error that
names the key, and every numeric field carries its limits, so an out-of-range value is an error
that names the field and the limit (pydantic's messages give the dotted location, e.g.
``optim.lr``). NaN and infinities are rejected in every float field. CLI overrides use
``--set section.key=value`` with the value parsed as YAML (``--set optim.lr=1e-4``,
``--set loss.budgets='{256: 0.5, 512: 0.5}'`` for the training job), as Hydra/OmegaConf users
expect; :func:`apply_overrides` lists the YAML 1.1 surprises and how to quote around them.

Source of the defaults: the BudgetDraft recipe, docs/DESIGN.md section 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

__all__ = [
    "ConfigError",
    "FieldError",
    "StrictModel",
    "load_config",
    "apply_overrides",
]


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the field and the limit."""


class FieldError(ValueError):
    """A cross-field check failed; ``field`` is the dotted field it is about, relative to the model
    that raised it, so the error is reported at ``optim.warmup_steps`` rather than at ``optim``
    (a ``model_validator`` otherwise only knows the model's own location).

    Args:
        field: dotted path below the raising model, e.g. ``"warmup_steps"`` or ``"loss.lb_weight"``.
        message: what is wrong and the limit, without the field name (the report prefixes it).
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class StrictModel(BaseModel):
    """Base for all configs: unknown keys are errors, values are re-validated on assignment, and
    NaN / infinities are rejected by every float field (otherwise ``lr=.nan`` would be reported
    against the field's upper bound, since NaN fails every comparison)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False, allow_inf_nan=False)


# --------------------------------------------------------------------------------------------
# Loading and overrides
# --------------------------------------------------------------------------------------------


_MAX_GOT_CHARS = 100  # a cross-field error's input is a whole section: show its start only


def _short_repr(value: Any) -> str:
    r = repr(value)
    return r if len(r) <= _MAX_GOT_CHARS else r[:_MAX_GOT_CHARS - 3] + "..."


def _format_validation_error(err: ValidationError, source: str) -> str:
    """One line per problem: ``dotted.field: reason (got value)``.

    A :class:`FieldError` from a cross-field check is reported at its field, with that field's
    value; other inputs are shown as a repr cut to ~100 characters (a model-level error's input is
    the whole section), and an error about the whole config shows no input at all.
    """
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        got: Any = e.get("input")
        show_got = "input" in e
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
            exc = (e.get("ctx") or {}).get("error")
            if isinstance(exc, FieldError):
                for part in exc.field.split("."):
                    loc.append(part)
                    got = got.get(part) if isinstance(got, Mapping) else None
                show_got = got is not None
        if not loc:
            show_got = False  # the input is the whole config
        lines.append(f"  {'.'.join(loc) or '<root>'}: {msg}" + (f" (got {_short_repr(got)})" if show_got else ""))
    return "\n".join(lines)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
        node = nxt
    node[parts[-1]] = value


def apply_overrides(tree: dict[str, Any], overrides: Sequence[str] | None) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (value parsed as YAML) to a nested dict, in place.

    Values follow PyYAML's YAML 1.1 rules, which surprise in a few places: ``1e3`` and ``1.0e3``
    are strings (YAML 1.1 wants ``1.0e+3``; a float field still accepts them, an int field does
    not: write ``1000``), ``no`` / ``off`` / ``yes`` / ``on`` are booleans, ``010`` is octal (8),
    ``~``, ``null`` and an empty value are null. To pass such a word as a string, quote it for
    YAML inside the shell's quotes: ``--set run.name="'no'"``. Lists and mappings use YAML flow
    syntax, quoted for the shell: ``--set loss.budgets='{256: 0.5, 512: 0.5}'``.

    Raises:
        ConfigError: an override without ``=`` or with an empty key.
    """
    for item in overrides or ():
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        _set_dotted(tree, key, yaml.safe_load(raw) if raw != "" else None)
    return tree


def load_config(model: type[BaseModel], path: str | Path | None = None,
                overrides: Sequence[str] | None = None,
                base: Mapping[str, Any] | None = None) -> Any:
    """Load ``model`` from a YAML file (optional), apply ``--set`` overrides, validate.

    Args:
        model: the pydantic config class (e.g. ``TrainJobConfig``).
        path: YAML file; ``None`` starts from ``base`` or the model's defaults.
        overrides: ``["optim.lr=1e-4", ...]`` (see :func:`apply_overrides` for the value syntax).
        base: a dict merged under the file's content.

    Raises:
        ConfigError: unreadable YAML, a non-mapping document, unknown keys, wrong types or
            out-of-range values; the message names each offending field (dotted path).
    """
    tree: dict[str, Any] = dict(base or {})
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config {path} must be a mapping at the top level, got {type(loaded).__name__}")
        tree.update(loaded)
    apply_overrides(tree, overrides)
    try:
        return model.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None
