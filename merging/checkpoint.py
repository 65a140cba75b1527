"""Streaming, validated access to the tensors of a Hugging Face model directory.

Tensors are read one at a time through ``safetensors.safe_open`` (memory-mapped), so a merge
holds one tensor per model at a time rather than N whole models. Names are canonical: the
architecture's ``base_model_prefix`` (the backbone's attribute in the task model class) is
stripped, so a bare base model and its fine-tuned classifiers name shared tensors alike;
tensors outside the base model are the task's head.
"""

from __future__ import annotations

import json
from collections.abc import KeysView
from pathlib import Path

import torch
import transformers
from safetensors import safe_open

from freemerge.merging.families import FAMILIES

FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")


class CheckpointError(ValueError):
    """A model directory that is missing, unreadable or does not fit the others."""


class Checkpoint:
    """The tensors of one model directory (``model.safetensors`` or a sharded index)."""

    def __init__(self, path: Path, label: str | None = None) -> None:
        self.path = Path(path)
        self.label = label or str(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.label}: model directory {self.path} does not exist")
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{self.label}: {config_path} is missing")
        self.config = json.loads(config_path.read_text())
        self.model_type = self.config.get("model_type")
        architecture = (self.config.get("architectures") or [None])[0]
        model_class = getattr(transformers, architecture or "", None)
        if model_class is None and self.model_type in FAMILIES:  # no architectures recorded
            model_class = FAMILIES[self.model_type].classifier_class
        self.prefix = getattr(model_class, "base_model_prefix", "") or ""
        self._file_of: dict[str, Path] = {}
        self._stored_name: dict[str, str] = {}
        self._shape: dict[str, tuple[int, ...]] = {}
        self._dtype: dict[str, str] = {}
        for file in self._weight_files():
            with safe_open(file, framework="pt") as handle:
                for stored in handle.keys():
                    name = self._canonical(stored)
                    header = handle.get_slice(stored)
                    self._file_of[name] = file
                    self._stored_name[name] = stored
                    self._shape[name] = tuple(header.get_shape())
                    self._dtype[name] = header.get_dtype()
        # A bare base model stores no prefix and has no head tensors.
        self._wrapped = any(stored != name for name, stored in self._stored_name.items())

    def _weight_files(self) -> list[Path]:
        single = self.path / "model.safetensors"
        index = self.path / "model.safetensors.index.json"
        if single.is_file():
            return [single]
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [self.path / shard for shard in shards]
        raise CheckpointError(
            f"{self.label}: no model.safetensors in {self.path} (only safetensors are read; "
            "pickled .bin checkpoints are refused)"
        )

    def _canonical(self, stored: str) -> str:
        head = f"{self.prefix}."
        return stored[len(head) :] if self.prefix and stored.startswith(head) else stored

    @property
    def names(self) -> KeysView[str]:
        """Canonical tensor names, in stored order (a view: membership tests are O(1))."""
        return self._file_of.keys()

    def is_head(self, name: str) -> bool:
        """True for tensors outside the base model (stored without the base prefix)."""
        return self._wrapped and self._stored_name[name] == name

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shape[name]

    def is_float(self, name: str) -> bool:
        """Whether tensor ``name`` is floating point (from the header, without reading it)."""
        return self._dtype[name] in FLOAT_DTYPES

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor by canonical name; floating-point tensors must be finite."""
        if name not in self._file_of:
            raise CheckpointError(f"{self.label}: has no tensor {name!r}")
        # Open per read: the memory map is released as soon as the tensor is copied out, so a
        # merge never holds whole checkpoints resident.
        with safe_open(self._file_of[name], framework="pt") as handle:
            tensor = handle.get_tensor(self._stored_name[name])
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{self.label}: tensor {name!r} contains NaN or Inf values")
        return tensor
