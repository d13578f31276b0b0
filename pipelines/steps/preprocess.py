"""DAG step 1, preprocess (Ray Data): source images -> Parquet shards + manifest.

Inputs:  none; ``data.source`` names an IDX folder ("" finds Fashion-MNIST), an image folder or Parquet.
Outputs: ``split=<train|val|test>/*.parquet`` and ``manifest.json`` (counts, image shape, fingerprint,
         per-channel statistics); ``pipelines/shards.py`` does the Ray Data work.
Run it:  ``vaegan run --config pipelines/configs/smoke.yaml --steps preprocess``

The feature net that every FID of this dataset uses (per-epoch validation, trials, evaluation) belongs
to the dataset, so its loader lives here too: trained once on the train split, cached by fingerprint.
"""
from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vaegan.imagerows import read_split

from .. import shards, sources, store
from ..config import EvalConfig, PipelineConfig
from ..context import RunContext, StepOutputs

if TYPE_CHECKING:
    import torch


@dataclasses.dataclass
class Inputs:
    pass


CACHE_KEY = ("data", "model.image_size", "model.channels")


def cache_extra(cfg: PipelineConfig, ctx: RunContext) -> dict[str, Any]:
    """The source's files (names, sizes, mtimes, a sampled content hash): an edited source is preprocessed again."""
    return {"source": sources.source_signature(cfg.data)}


@dataclasses.dataclass(kw_only=True)
class Outputs(StepOutputs):
    manifest: dict[str, Any]

    @property
    def image_shape(self) -> list[int]:
        return self.manifest["image_shape"]

    @property
    def train_rows(self) -> int:
        return int(self.manifest["counts"]["train"])

    @property
    def train_rows_source(self) -> str:
        """Where ``train_rows`` comes from, for messages."""
        return f"{self.train_rows} training images in the preprocessed train split {self.path}"

    def split_dir(self, split: str) -> Path:
        return self.path / f"split={split}"

    def images(self, split: str, limit: int = 0) -> torch.Tensor:
        """Up to ``limit`` images of ``split`` (0: all), float32 (N, C, H, W) in [0, 1]."""
        import torch  # in the method, not at the top: the driver imports this module (see steps/__init__.py)
        from vaegan.data import to_float
        images, _ = read_split(self.split_dir(split), self.image_shape, limit=limit)
        return to_float(torch.from_numpy(images))

    def feature_net(self, cache: str, cfg: EvalConfig) -> tuple[str, str]:
        """The domain feature net of this dataset (path or URI, name): trained on its train split once, then
        cached in the folder or object-storage prefix ``cache`` (``RunContext.featnet_cache``) by the data
        fingerprint."""
        from vaegan.featnet import feature_net_path
        file_name = feature_net_path("", self.manifest["fingerprint"]).name
        cached = store.join(cache, file_name)
        if not store.is_remote(cache):
            return cached, self._load_or_train_feature_net(Path(cache), cfg)
        if store.exists(cached):
            return cached, self._load_or_train_feature_net(store.local_view(cached).parent, cfg)
        with tempfile.TemporaryDirectory(prefix="vaegan-featnet-") as local:
            name = self._load_or_train_feature_net(Path(local), cfg)
            store.upload(Path(local, file_name), cached)
        return cached, name

    def _load_or_train_feature_net(self, cache: Path, cfg: EvalConfig) -> str:
        """The feature net's name, trained into the local folder ``cache`` unless it is there already."""
        import torch
        from vaegan.featnet import load_or_train_feature_net
        fingerprint = self.manifest["fingerprint"]
        images, labels = read_split(self.split_dir("train"), self.image_shape)
        test_images, test_labels = read_split(self.split_dir("test"), self.image_shape)
        labelled = bool(self.manifest["classes"]) and (labels >= 0).all()
        _, name = load_or_train_feature_net(
            cache, fingerprint, torch.from_numpy(images), torch.from_numpy(labels) if labelled else None,
            num_classes=max(len(self.manifest["classes"]), 1), test_images=torch.from_numpy(test_images),
            test_labels=torch.from_numpy(test_labels), epochs=cfg.featnet_epochs,
            log=lambda line: print(f"[featnet] {line}", flush=True))
        return name


def run(cfg: PipelineConfig, ctx: RunContext, inputs: Inputs, out: Path) -> Outputs:
    manifest = shards.run(cfg.data, cfg.model, out)
    print(f"[preprocess] {manifest['counts']} images of shape {manifest['image_shape']}, "
          f"fingerprint {manifest['fingerprint']}", flush=True)
    return Outputs(manifest=manifest, folder=str(out))
