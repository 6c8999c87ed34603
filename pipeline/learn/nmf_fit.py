"""Fitting the supervised-NMF baseline's dictionaries on a MUSDB-layout folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torchaudio

from demix.models import load_model
from demix.models.weights import save
from demix.pipeline.data import MusdbDataset
from demix.pipeline.learn.checkpoints import write_json


def fit_nmf(
    dataset: str | Path,
    dest: str | Path,
    *,
    components: int = 32,
    fit_iters: int = 200,
    max_tracks: int | None = None,
    seed: int = 0,
) -> tuple[Path, str]:
    """Learn the supervised-NMF baseline's dictionaries from a MUSDB-layout folder.

    Writes ``<dest>/nmf-<sha8>.safetensors`` (+ ``.json``) loadable with
    ``load_model("nmf", components=..., weights=path)``; returns ``(path, sha256)``.
    """
    data = MusdbDataset(dataset)
    model = load_model("nmf", components=components, pretrained=False)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(data))[: max_tracks or len(data)]

    def examples():
        for i in order:
            tracks = data.load(int(i))
            stems = torch.stack([torch.from_numpy(tracks[s]) for s in model.sources])
            if data.tracks[int(i)].sample_rate != model.sample_rate:
                stems = torchaudio.functional.resample(stems, data.tracks[int(i)].sample_rate, model.sample_rate)
            yield stems

    model.fit(examples(), iters=fit_iters, seed=seed)
    final, digest = save(model.state_dict(), dest, "nmf")
    write_json(final.with_suffix(".json"), {
        "model": "nmf", "options": {"components": components}, "sources": list(model.sources),
        "sample_rate": model.sample_rate, "sha256": digest, "tracks": len(order), "fit_iters": fit_iters,
    })
    return final, digest
