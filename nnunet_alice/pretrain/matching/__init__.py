"""Anatomical correspondence between volumes: the matcher interface and its implementations."""
from nnunet_alice.pretrain.matching.base import CaseVolume, Matcher

__all__ = ["CaseVolume", "Matcher", "build_matcher"]


def build_matcher(name: str, config, cache_dir: str | None = None) -> Matcher:
    """Create the matcher named by ``--matcher`` (imports lazily: only the chosen one is loaded)."""
    if name == "intra":
        from nnunet_alice.pretrain.matching.intra import IntraVolumeMatcher
        return IntraVolumeMatcher(jitter=config.intra_jitter, patch_size=config.patch_size)
    if name == "registration":
        from nnunet_alice.pretrain.matching.registration import RegistrationMatcher
        return RegistrationMatcher(cache_dir=cache_dir)
    if name == "embedding":
        from nnunet_alice.embedding import EmbeddingMatcher
        return EmbeddingMatcher.from_config(config, cache_dir=cache_dir)
    from nnunet_alice.errors import AliceError
    raise AliceError(f"unknown matcher {name!r}")
