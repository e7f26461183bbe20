"""Start-up hook imported by ``nnunet_alice.pth`` in every interpreter.

It puts ``nnunet_alice/_ext`` on ``nnUNet_extTrainer`` so that
``nnUNetv2_train ... -tr nnUNetTrainerAlice`` works without any setup. It is
stdlib-only, must never raise, and does nothing when
``NNUNET_ALICE_NO_AUTODISCOVERY=1`` is set.
"""


def _register() -> None:
    """Register the trainer folder; swallow every error (start-up must not fail)."""
    try:
        import os

        if os.environ.get("NNUNET_ALICE_NO_AUTODISCOVERY", "").strip().lower() in (
                "1", "true", "yes", "on"):
            return
        from nnunet_alice.discovery import ensure_registered

        ensure_registered(os.environ)
    except Exception:  # noqa: BLE001 - a broken hook must not break Python
        pass


_register()
