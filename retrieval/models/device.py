"""The device a model runs on (CLIPSEARCH_DEVICE): `auto` resolved, and a GPU that is not there
refused with its own error, before any weights are read."""

from __future__ import annotations

from retrieval.errors import DeviceUnavailable

DEVICE_SETTING = "CLIPSEARCH_DEVICE"


def resolve_device(device: str, setting: str = DEVICE_SETTING) -> str:
    """`cpu` or a CUDA device for `auto`, `cpu`, `cuda` or `cuda:N`; DeviceUnavailable naming
    `setting` (the variable or the flag it came from) when the CUDA device is not there."""
    if device == "cpu":
        return device
    import torch  # a second or two: callers run it after the checks that need no torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available():
        if torch.version.cuda is None:
            reason = "this torch build has no CUDA support (a CPU-only build)"
        else:
            reason = (
                "no CUDA device is visible (no GPU, no NVIDIA driver, or CUDA_VISIBLE_DEVICES "
                "hides it)"
            )
        raise DeviceUnavailable(setting, device, reason)
    number = int(device[5:]) if device.startswith("cuda:") else 0
    count = torch.cuda.device_count()
    if number >= count:
        raise DeviceUnavailable(
            setting, device, f"only {count} CUDA device(s) visible, cuda:0 to cuda:{count - 1}"
        )
    return device


def check_device(device: str, setting: str = DEVICE_SETTING) -> None:
    """DeviceUnavailable now, for a command about to load a model on a CUDA device that is not
    there (`auto` and `cpu` always work)."""
    if device.startswith("cuda"):
        resolve_device(device, setting)
