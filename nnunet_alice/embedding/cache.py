"""Per-case embeddings, computed once and cached on disk and in memory.

SAM's embeddings are pre-computed offline and the Alice loop only reads them (docs/method.md "Data and views"); the
official loop re-reads the volume on every try. Here each case is embedded once (coarse + fine maps, fp16 on
disk) and kept in memory; matching never touches the disk again.

Layout (``root`` is ``$nnUNet_preprocessed/<Dataset>`` by default)::

    <root>/alice_embeddings/<model sha256[:16]>/<case>__<case fingerprint[:16]>.npz

The model digest keys the folder and the case fingerprint (shape, spacing, subsampled voxels) keys the
file, so a retrained model or changed data never reuse stale maps; a file that cannot be read or does not
match its key is recomputed and rewritten atomically, and older files of the same case are removed.
"""
from __future__ import annotations

import io
import os
from typing import Dict, Optional

import numpy as np

from nnunet_alice.checkpoint import atomic_write_bytes
from nnunet_alice.pretrain.matching.base import CaseVolume
from nnunet_alice.embedding.search import CaseEmbedding
from nnunet_alice.pretrain.matching.fingerprint import case_fingerprint, remove_stale, safe_name

CACHE_SUBDIR = "alice_embeddings"
CACHE_VERSION = 1


class EmbeddingStore:
    """Maps a case to its :class:`CaseEmbedding`: memory, else the disk cache, else the network."""

    def __init__(self, net, model_sha256: str, target_spacing: float, root: Optional[str] = None,
                 device: str = "cpu", model_path: Optional[str] = None):
        self.net = net
        self.model_sha256 = model_sha256
        self.target_spacing = float(target_spacing)
        self.root = root
        self.device = device
        self.model_path = model_path
        self.memory: Dict[str, CaseEmbedding] = {}
        self.n_computed = 0
        self.n_loaded = 0

    def __getstate__(self):  # data-loading workers get the cached maps, not the network
        state = self.__dict__.copy()
        state["net"] = None
        return state

    @property
    def folder(self) -> Optional[str]:
        if self.root is None:
            return None
        return os.path.join(self.root, CACHE_SUBDIR, self.model_sha256[:16])

    def get(self, case: CaseVolume) -> CaseEmbedding:
        hit = self.memory.get(case.case_id)
        if hit is not None and tuple(hit.case_shape) == tuple(case.shape):
            return hit
        return self.refresh(case)

    def refresh(self, case: CaseVolume) -> CaseEmbedding:
        """Validate (fingerprint) and load or compute the embedding of ``case``, bypassing the memory."""
        arr = case.channel(0)
        fp = case_fingerprint(case, arr)
        path = None
        emb = None
        if self.folder is not None:
            path = os.path.join(self.folder, f"{safe_name(case.case_id)}__{fp[:16]}.npz")
            emb = self._read(path, fp, tuple(case.shape))
            if emb is not None:
                self.n_loaded += 1
        if emb is None:
            emb = self._compute(arr, case.spacing)
            self.n_computed += 1
            if path is not None:
                self._write(path, emb, fp)
                remove_stale(self.folder, safe_name(case.case_id) + "__", os.path.basename(path))
        self.memory[case.case_id] = emb
        return emb

    # ------------------------------------------------------------------ compute
    def _network(self):
        if self.net is None:
            if self.model_path is None:
                raise RuntimeError("EmbeddingStore: no network in this process to embed a new case")
            from nnunet_alice.embedding.model_file import load_model
            self.net, _, _ = load_model(self.model_path, self.device)
        return self.net

    def _compute(self, arr: np.ndarray, spacing) -> CaseEmbedding:
        import torch

        from nnunet_alice.embedding.network import embed_volume
        from nnunet_alice.embedding.volume import to_embedding_grid

        net = self._network()
        vol, scale = to_embedding_grid(arr, spacing, self.target_spacing)
        device = next(net.parameters()).device
        coarse, fine = embed_volume(net, torch.from_numpy(vol).to(device))
        return CaseEmbedding(coarse=coarse.float().cpu().numpy().astype(np.float32),
                             fine=fine.cpu().numpy().astype(np.float16), scale=scale,
                             case_shape=tuple(int(s) for s in arr.shape),
                             coarse_stride=net.coarse_stride, fine_stride=net.fine_stride)

    # ------------------------------------------------------------------ disk
    def _write(self, path: str, emb: CaseEmbedding, fp: str) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        buf = io.BytesIO()
        np.savez(buf, coarse=emb.coarse.astype(np.float16), fine=emb.fine.astype(np.float16), scale=emb.scale,
                 case_shape=np.asarray(emb.case_shape), strides=np.asarray([emb.coarse_stride, emb.fine_stride]),
                 fingerprint=np.asarray(fp), model_sha256=np.asarray(self.model_sha256),
                 version=np.asarray(CACHE_VERSION))
        atomic_write_bytes(path, buf.getvalue())

    def _read(self, path: str, fp: str, case_shape) -> Optional[CaseEmbedding]:
        if not os.path.isfile(path):
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                if (int(z["version"]) != CACHE_VERSION or str(z["fingerprint"]) != fp
                        or str(z["model_sha256"]) != self.model_sha256
                        or tuple(int(s) for s in z["case_shape"]) != tuple(case_shape)):
                    return None
                coarse, fine = z["coarse"].astype(np.float32), z["fine"].astype(np.float16)
                scale, strides = z["scale"].astype(float), [int(s) for s in z["strides"]]
        except Exception:  # truncated / corrupt / foreign file: recompute
            return None
        if coarse.ndim != 4 or fine.ndim != 4 or not (np.all(np.isfinite(coarse)) and np.all(np.isfinite(fine))):
            return None
        grid = np.round(np.asarray(case_shape) * scale).astype(int)
        fine_ok = tuple(fine.shape[1:]) == tuple(-(-grid // strides[1]))
        if not fine_ok or tuple(coarse.shape[1:]) != tuple(-(-grid // strides[0])):
            return None
        return CaseEmbedding(coarse, fine, scale, tuple(case_shape), strides[0], strides[1])
