"""deploy/serve_config.yaml validates with Ray's own Serve schema and its import path imports."""

import importlib
import os
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


def test_fronts_feed_every_model_replica_and_the_proxy_holds_their_room(
    monkeypatch,
):
    """``front_replicas`` sets the fronts apart from the model replicas; a front has two calls
    out, or one per model replica it feeds where that is more, and the proxy's room is the
    fronts' rooms together."""
    import pytest

    from freemerge.serving.app import build_app
    from freemerge.serving.local import _proxy_environment
    from freemerge.serving.proxy import PROXY_LIMIT_ENV
    from freemerge.serving.settings import ServingOptions

    def layout(**args: object) -> tuple[int, int, int, str]:
        options = ServingOptions.from_mapping({"artifact": "a", **args})
        front = build_app({"artifact": "a", **args})._bound_deployment
        (models,) = [a for a in front.init_args if hasattr(a, "_bound_deployment")]
        monkeypatch.delenv(PROXY_LIMIT_ENV, raising=False)
        _proxy_environment(options, "proxy")
        return (
            models._bound_deployment._deployment_config.num_replicas,
            front._deployment_config.num_replicas,
            options.calls_per_front,
            os.environ[PROXY_LIMIT_ENV],
        )

    assert layout() == (1, 1, 2, "128")
    assert layout(replicas=3) == (3, 3, 2, "384")
    assert layout(replicas=2, front_replicas=1) == (2, 1, 2, "128")
    assert layout(replicas=4, front_replicas=1) == (4, 1, 4, "128")
    assert layout(replicas=5, front_replicas=2, max_queued_requests=10) == (5, 2, 3, "20")
    scaling = {"min_replicas": 1, "max_replicas": 4}
    autoscaled = ServingOptions(artifact="a", autoscaling=scaling, front_replicas=1)
    assert (autoscaled.fronts, autoscaled.calls_per_front) == (4, 2)
    with pytest.raises(ValueError, match="front_replicas must be >= 1"):
        ServingOptions.from_mapping({"artifact": "a", "front_replicas": "0"})
