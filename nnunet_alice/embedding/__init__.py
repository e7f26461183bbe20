"""A learned dense anatomical embedding (our own SAM-style network) and the ``embedding`` matcher.

SAM: Yan et al., "SAM: Self-supervised Learning of Pixel-wise Anatomical Embeddings in Radiological
Images", IEEE TMI 2022. Modules: :mod:`.network` (the model), :mod:`.pairs` + :mod:`.loss` + :mod:`.train`
(self-supervised training), :mod:`.model_file` (versioned checkpoint), :mod:`.volume` (embedding grid),
:mod:`.cache` (per-case embeddings), :mod:`.search` (coarse-to-fine matching), :mod:`.matcher`, :mod:`.cli`
(``alice_embed``).
"""
from nnunet_alice.embedding.matcher import EmbeddingMatcher

__all__ = ["EmbeddingMatcher"]
