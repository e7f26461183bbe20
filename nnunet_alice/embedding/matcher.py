"""``embedding``: anatomical correspondence from our self-supervised dense embedding (SAM-style).

Replaces SAM in Alice's view mining (Jiang et al., ICCV 2023, Sec. 3.1; docs/method.md "Data and views"): the model
trained by ``alice_embed`` embeds every case once (:class:`.cache.EmbeddingStore`), and a query point of
case A is matched into case B by coarse-to-fine cosine similarity (:func:`.search.match_embeddings`);
the score is the mean of the coarse and fine cosines. Thresholding, retries and the intra fallback are done
by :func:`nnunet_alice.pretrain.matching.sampling.match_with_retries`, which counts them in ``stats()``.

Cycle check (our addition): the embedding's cosines are high almost everywhere inside the body, so on its
own the 0.7 threshold accepted nearly every match, wrong ones included (``docs/correspondence.md``). The
match is therefore mapped back B -> A; if it lands farther than ``cycle_tolerance_mm`` from the query point,
the score is capped at 0, so the sampler rejects it and retries. ``cycle_tolerance_mm=None`` switches this
off (plain SAM scoring).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence, Tuple

import numpy as np

from nnunet_alice.errors import AliceError
from nnunet_alice.pretrain.matching.base import CaseVolume, Matcher
from nnunet_alice.embedding.cache import EmbeddingStore
from nnunet_alice.embedding.search import match_embeddings


def _device(name: Optional[str]) -> str:
    import torch
    if name and str(name).startswith("cuda") and torch.cuda.is_available():
        return str(name)
    return "cpu"


#: one fine cell of the default 4 mm grid; 8 mm accepted more wrong matches (docs/correspondence.md)
CYCLE_TOLERANCE_MM = 4.0


class EmbeddingMatcher(Matcher):
    name = "embedding"
    inter_volume = True

    def __init__(self, store: EmbeddingStore, top_k: int = 8, cycle_tolerance_mm: Optional[float] = CYCLE_TOLERANCE_MM):
        self.store = store
        self.top_k = int(top_k)
        self.cycle_tolerance_mm = cycle_tolerance_mm

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_model_file(cls, path: str, cache_root: Optional[str] = None, device: str = "cpu",
                        top_k: int = 8) -> "EmbeddingMatcher":
        """Matcher over the model at ``path``; embeddings cached under ``<cache_root>/alice_embeddings/``."""
        from nnunet_alice.embedding.model_file import load_model

        net, ckpt, digest = load_model(path, _device(device))
        store = EmbeddingStore(net, digest, float(ckpt["target_spacing"]), root=cache_root,
                               device=_device(device), model_path=path)
        return cls(store, top_k=top_k)

    @classmethod
    def from_config(cls, config, cache_dir: Optional[str] = None) -> "EmbeddingMatcher":
        """The model trained for ``config``'s dataset/plans/configuration, or a one-line AliceError.

        Embeddings are cached in ``$nnUNet_preprocessed/<Dataset>/alice_embeddings/``, where ``alice_embed``
        already wrote them, so training stage and pretraining share one cache; ``cache_dir`` is used instead
        only when ``nnUNet_preprocessed`` is not set.
        """
        from nnunet_alice.embedding.model_file import model_path

        dataset, plans, configuration = config.dataset_name, config.plans, config.configuration
        path = model_path(dataset, plans, configuration)
        if not os.path.isfile(path):
            raise AliceError(f"no anatomical embedding model at {path}; train it first with "
                             f"'alice_embed -d {dataset} -c {configuration} -p {plans}' "
                             f"(or use --matcher registration or --matcher intra)")
        if os.environ.get("nnUNet_preprocessed"):
            cache_dir = os.path.join(os.environ["nnUNet_preprocessed"], dataset)
        return cls.from_model_file(path, cache_root=cache_dir, device=getattr(config, "device", "cpu"))

    # ------------------------------------------------------------------ Matcher
    def prepare(self, cases: Sequence[CaseVolume]) -> None:
        """Embed (or load from the cache, after checking the fingerprint) every case once."""
        progress = None
        if len(cases) > 8:
            from tqdm import tqdm
            progress = tqdm(total=len(cases), desc="embeddings", unit="case", dynamic_ncols=True)
        for case in cases:
            self.store.refresh(case)
            if progress is not None:
                progress.update(1)
        if progress is not None:
            progress.close()

    def match(self, case_a: CaseVolume, point_a: np.ndarray, case_b: CaseVolume,
              rng: Optional[np.random.Generator] = None) -> Tuple[np.ndarray, float]:
        ea, eb = self.store.get(case_a), self.store.get(case_b)
        point_a = np.asarray(point_a, dtype=float)
        point_b, score = match_embeddings(ea, point_a, eb, self.top_k)
        if self.cycle_tolerance_mm is not None:
            back, _ = match_embeddings(eb, point_b, ea, self.top_k)
            if np.linalg.norm((back - point_a) * np.asarray(case_a.spacing, dtype=float)) > self.cycle_tolerance_mm:
                score = min(score, 0.0)
        return point_b, score
