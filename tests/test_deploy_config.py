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
        assert [d.name for d in app.deployments] == ["ClassifierServer"]
