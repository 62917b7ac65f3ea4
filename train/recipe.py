"""Compose a recipe from ``recipes/`` with Hydra, typed by the schema in ``hymoe.train.config``.

One way in for every command: ``load_recipe(name, overrides)``. Errors come back as one
``ConfigError`` line naming the field (Hydra's own messages run to several lines and a stack).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from hymoe.train.config import ConfigError, HymoeConfig

def recipes_dir() -> Path:
    import hymoe.recipes

    return Path(hymoe.recipes.__file__).parent


def list_recipes() -> list[str]:
    return sorted(p.stem for p in recipes_dir().glob("*.yaml"))


def _register() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="hymoe_schema", node=HymoeConfig)
    if not OmegaConf.has_resolver("now"):
        import datetime

        OmegaConf.register_new_resolver(
            "now", lambda fmt: datetime.datetime.now().strftime(fmt), use_cache=True
        )


def _one_line(e: BaseException) -> str:
    """Hydra/OmegaConf errors → 'field: reason'."""
    cause = e
    while cause.__cause__ is not None and not isinstance(cause, OmegaConfBaseException):
        cause = cause.__cause__
    if isinstance(cause, OmegaConfBaseException):
        key = getattr(cause, "full_key", None)
        msg = str(getattr(cause, "msg", None) or cause).splitlines()[0]
        if "not in struct" in msg or "not in '" in msg:
            msg = "unknown key (check the spelling; `hymoe train RECIPE --help` lists the keys)"
        return f"{key}: {msg}" if key else msg
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _reject_unknown_keys(node, schema, prefix: str) -> None:
    """`+key=value` overrides can add keys the schema lacks; every key must be a field."""
    import dataclasses

    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key in node.keys():
        if key == "hydra":
            continue
        if key not in fields:
            raise ConfigError(
                f"{prefix}{key}: unknown key (check the spelling; `hymoe train RECIPE --help` "
                "lists the keys)"
            )
        sub = fields[key].default_factory if fields[key].default_factory is not dataclasses.MISSING else None
        if sub is not None and dataclasses.is_dataclass(sub) and isinstance(node[key], DictConfig):
            _reject_unknown_keys(node[key], sub, f"{prefix}{key}.")


def compose(recipe: str, overrides: list[str] | None = None) -> DictConfig:
    """The composed, schema-typed recipe (interpolations unresolved)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if recipe not in list_recipes():
        raise ConfigError(
            f"recipe {recipe!r} not found; available: {', '.join(list_recipes())}"
        )
    _register()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(recipes_dir()), version_base=None):
            cfg = hydra_compose(config_name=recipe, overrides=list(overrides or []))
    except Exception as e:  # noqa: BLE001 - Hydra raises many types; all become one line
        raise ConfigError(_one_line(e)) from None
    finally:
        GlobalHydra.instance().clear()
    return cfg


def load_recipe(recipe: str, overrides: list[str] | None = None) -> HymoeConfig:
    """Compose, resolve and convert to the typed dataclass tree (not yet cross-validated)."""
    cfg = compose(recipe, overrides)
    try:
        _reject_unknown_keys(cfg, HymoeConfig, "")
        OmegaConf.resolve(cfg)
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(_one_line(e)) from None
    for section in ("data",):
        if getattr(obj, section).path == "???":
            raise ConfigError(f"{section}.path: required; point it at a `hymoe data prepare` output")
    return obj


def to_yaml(cfg: HymoeConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
