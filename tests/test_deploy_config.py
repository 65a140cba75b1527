"""deploy/serve_config.yaml validates with Ray's own Serve schema and its import path imports."""

import importlib
from pathlib import Path

import yaml
from ray.serve.schema import ServeDeploySchema

ROOT = Path(__file__).resolve().parent.parent


def test_serve_config_validates_and_imports():
    config = yaml.safe_load((ROOT / "deploy" / "serve_config.yaml").read_text())
    schema = (
        ServeDeploySchema.model_validate(config)
        if hasattr(ServeDeploySchema, "model_validate")
        else ServeDeploySchema.parse_obj(config)
    )
    for app in schema.applications:
        module, _, attribute = app.import_path.partition(":")
        builder = getattr(importlib.import_module(module), attribute)
        assert callable(builder)
        assert app.args["artifact"]
        assert [d.name for d in app.deployments] == built_deployments(app.args)


def built_deployments(args: dict) -> list[str]:
    """The names of the deployments ``build_app(args)`` creates: the models, then the front."""
    from freemerge.serving.app import build_app

    front = build_app(args)._bound_deployment
    (models,) = [a for a in front.init_args if hasattr(a, "_bound_deployment")]
    return [models._bound_deployment.name, front.name]


def test_serve_config_args_are_serving_options_with_their_defaults():
    """Every arg is a ServingOptions field, and the values it repeats are the defaults (one
    set of defaults: the file only shows them)."""
    import dataclasses

    from freemerge.serving.settings import ServingOptions

    config = yaml.safe_load((ROOT / "deploy" / "serve_config.yaml").read_text())
    for app in config["applications"]:
        options = ServingOptions.from_mapping(app["args"])
        defaults = {f.name: f.default for f in dataclasses.fields(ServingOptions)}
        repeated = {k: v for k, v in app["args"].items() if k not in ("artifact", "device")}
        assert {k: getattr(options, k) for k in repeated} == {k: defaults[k] for k in repeated}


def test_unknown_or_malformed_serving_options_are_refused():
    import pytest

    from freemerge.serving.settings import ServingOptions

    with pytest.raises(ValueError, match="unknown serving option 'max_item'"):
        ServingOptions.from_mapping({"artifact": "a", "max_item": 3})
    with pytest.raises(ValueError, match="max_items must be an integer"):
        ServingOptions.from_mapping({"artifact": "a", "max_items": "many"})
    with pytest.raises(ValueError, match="unknown mixing 'top'"):
        ServingOptions.from_mapping({"artifact": "a", "mixing": "top"})
    assert ServingOptions.from_mapping({"zoo": "z", "tasks": "a,b"}).tasks == ["a", "b"]
