"""Start-up hook imported by ``nnunet_alice.pth`` in every interpreter.

It puts ``nnunet_alice/_ext`` on ``nnUNet_extTrainer`` so that
``nnUNetv2_train ... -tr nnUNetTrainerAlice`` works without any setup. It is
stdlib-only, must never raise, and does nothing when
``nnUNet_alice_no_autodiscovery=1`` is set.
"""


def _register() -> None:
    """Register the trainer folder; swallow every error (start-up must not fail)."""
    try:
        import os

        from nnunet_alice.discovery import ensure_registered, opted_out

        if opted_out():
            return
        ensure_registered(os.environ)
    except Exception:  # noqa: BLE001 - a broken hook must not break Python
        pass


_register()
