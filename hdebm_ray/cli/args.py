"""Flag types of ``hdebm-ray``: every flag is checked when parsed, before any work starts, and a bad one is one
line naming the flag (``OneLineParser``), never a traceback later."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from ..io.checkpoint import CheckpointError, checkpoint_or_newest
from ..io.storage import is_uri


class OneLineParser(argparse.ArgumentParser):
    """argparse, with a user error as one line ``hdebm-ray <command>: error: ...`` (exit 2) instead of the usage
    block; ``--help`` still shows the usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def at_least(lo: float, kind=int):
    """An argparse type: a number of ``kind`` that is >= ``lo``."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if not math.isfinite(value) or value < lo:
            raise argparse.ArgumentTypeError(f"must be at least {lo:g}, got {text}")
        return value

    parse.__name__ = f"{kind.__name__} >= {lo:g}"
    return parse


def device(text: str) -> str:
    """An argparse type: a torch device this machine has (``cpu``, ``cuda``, ``cuda:1``, ``mps``)."""
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (cpu, cuda, cuda:N, mps)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has no CUDA device")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has no MPS device")
    return text


def checkpoint(text: str) -> str:
    """An argparse type: a complete checkpoint directory (local path or URI), or a stage folder (its newest complete
    checkpoint), checked before anything starts."""
    try:
        return checkpoint_or_newest(text.rstrip("/"))
    except CheckpointError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def local_checkpoint(text: str) -> str:
    """``checkpoint``, on a local path or mount: the offline commands (eval, sample, enfe, ood) read files."""
    if is_uri(text):
        raise argparse.ArgumentTypeError(
            f"'{text}': the offline commands read a local checkpoint directory; copy it here first"
        )
    return checkpoint(text)


def existing_dir(text: str) -> str:
    """An argparse type: a local directory that exists."""
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"'{text}' is not a directory")
    return text


# What ``save_grid`` can write (Pillow picks the format from the extension).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def image_out(text: str) -> str:
    """An argparse type: an image file to write: a known extension, not a folder, and no file where a folder on its
    path must be (whether it exists already is the command's question: ``--overwrite``)."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"'{text}' is a folder; name the image file to write, e.g. {text}/samples.png")
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise argparse.ArgumentTypeError(f"'{text}' has no image extension; use one of {', '.join(IMAGE_SUFFIXES)}")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise argparse.ArgumentTypeError(f"'{text}': '{parent}' is a file, not a folder")
            break
    return text
