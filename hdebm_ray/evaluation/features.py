"""Feature extractors for FID / KID, chosen by ``eval.features`` (docs/algorithms.md §9).

Every extractor is a pair (``fn``, ``resize``) in clean-fid's own contract: ``resize`` maps one H×W×3 image in
[0, 255] (numpy) to the extractor's input size, ``fn`` maps a float batch B×3×h×w in [0, 255] to B×D features.

- ``inception``: clean-fid's TorchScript InceptionV3, ``mode="clean"`` (PIL bicubic to 299×299) — the FID of the
  papers; its ``fn.features_and_probs`` also gives the softmax over the 1008 classes, for the Inception Score. Its
  weights (``eval.inception_path``) are downloaded on first use into a per-user cache
  (``~/.cache/hdebm_ray/inception``, mode 700: a file others can replace would be TorchScript code we run), to a
  temporary file with a timeout, moved into place when complete; offline machines must have the file already. Its
  SHA-256 is checked before every use: against ``eval.inception_sha256``, else against the hash pinned beside the
  file when it was first used (neither clean-fid nor NVlabs publishes one).
- ``classifier``: a small CNN trained once on the dataset's labels and cached; its penultimate layer (128-d). For
  CPU datasets such as ``digits`` where Inception is meaningless and unavailable. **Not Inception-FID**: numbers
  compare only with each other.
- ``torchscript``: a user TorchScript file with the same contract as ``fn`` (input at 299×299, clean resize).
- ``raw``: the samples themselves, flattened: ``toy2d`` points, or image pixels (a cheap metric for tests and smoke
  runs, not a measure of image quality).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..config import Config
from ..data.datasets import build_dataset, data_fingerprint, iter_batches
from ..progress import progress as show_progress

INCEPTION_PATH = Path.home() / ".cache" / "hdebm_ray" / "inception" / "inception-2015-12-05.pt"
DOWNLOAD_TIMEOUT_S = 120.0  # per read of the download: a stalled connection fails instead of hanging
CLASSIFIER_MAX_IMAGES = 50_000  # the feature classifier's training set, drawn at random beyond that
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"


# The evaluation keys that name a file to load: taken from the user's command or run config, never from a checkpoint's
# (a checkpoint from elsewhere could name a TorchScript file, and loading it runs its code).
FILE_KEYS = ("eval.torchscript_path", "eval.inception_path", "eval.inception_sha256")


def eval_files(cfg: Config) -> dict:
    """``FILE_KEYS`` as ``cfg`` sets them."""
    return {key: getattr(cfg.eval, key.split(".", 1)[1]) for key in FILE_KEYS}


class EvalError(RuntimeError):
    """Evaluation cannot run as configured (missing weights, wrong feature choice); the message says what to do."""


def native_resize(img: np.ndarray) -> np.ndarray:
    """Keep the image at its own resolution (clean-fid treats float input as already in [0, 255])."""
    return img.astype(np.float32)


def clean_resize():
    from cleanfid.resize import build_resizer

    return build_resizer("clean")


def inception_extractor(cfg: Config, device: torch.device):
    """clean-fid's InceptionV3 (``mode="clean"``) from ``eval.inception_path``, its checksum verified first."""
    path = Path(cfg.eval.inception_path) if cfg.eval.inception_path else INCEPTION_PATH
    if not path.is_file():
        if path != INCEPTION_PATH:
            raise EvalError(f"eval.inception_path = '{path}': no such file (clean-fid's {INCEPTION_URL})")
        download_inception()
    elif path == INCEPTION_PATH:
        private_folder(path.parent)
    verify_sha256(path, cfg.eval.inception_sha256)
    from cleanfid.inception_torchscript import InceptionV3W

    # clean-fid's wrapper (its normalisation and layers call), around the verified file: its constructor would load
    # from a fixed name in a folder. Relies on clean-fid 0.1.35's attributes (pinned in pyproject.toml).
    model = InceptionV3W.__new__(InceptionV3W)
    nn.Module.__init__(model)
    model.base = torch.jit.load(str(path), map_location="cpu").eval()
    model.layers, model.resize_inside = model.base.layers, False
    model = model.to(device).eval()

    def fn(x):
        return model(x)

    def features_and_probs(x):
        # The pool3 features (FID, KID, precision / recall) and the class probabilities (Inception Score) of one
        # batch; the probabilities without the output bias, as the original IS code computes them.
        return torch.cat([model(x), model.base(x.to(device), no_output_bias=True)], dim=1)

    fn.features_and_probs = features_and_probs  # what FeatureSpace uses when it computes the Inception Score
    return fn, clean_resize()


def private_folder(folder: Path) -> Path:
    """``folder``, created mode 700 if missing; ``EvalError`` if others can write to it or it is another user's
    (whoever can replace a file there chooses the code ``torch.jit.load`` runs)."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = folder.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise EvalError(
            f"the Inception weights folder '{folder}' is writable by others or not yours (mode {st.st_mode & 0o777:o}):"
            f" chmod 700 it, or set eval.inception_path to a file in a folder only you can write"
        )
    return folder


def download_inception() -> None:
    """The weights into the per-user cache: to a temporary file (a read timeout of ``DOWNLOAD_TIMEOUT_S``), moved
    into place once complete; an offline machine gets a message saying what to copy where."""
    import shutil
    import tempfile
    import urllib.request

    folder = private_folder(INCEPTION_PATH.parent)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".inception-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(INCEPTION_URL, timeout=DOWNLOAD_TIMEOUT_S) as src:
            shutil.copyfileobj(src, out)
        os.replace(tmp, INCEPTION_PATH)
    except Exception as err:
        Path(tmp).unlink(missing_ok=True)  # no half-downloaded file left to be taken for the weights
        raise EvalError(
            f"eval.features = 'inception' needs clean-fid's InceptionV3 weights at {INCEPTION_PATH}, which are "
            f"missing and could not be downloaded ({type(err).__name__}: {err}). On an offline machine copy "
            f"{INCEPTION_URL} there (or set eval.inception_path) on every node that evaluates, or use "
            "eval.features = 'classifier'."
        ) from err


def verify_sha256(path: Path, expected: str) -> str:
    """The file's SHA-256, which must equal ``expected`` (or, if that is '', the hash pinned in ``<path>.sha256``
    when the file was first used: pinned now if there is none). ``EvalError`` naming both hashes otherwise."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    digest = h.hexdigest()
    pin = path.with_name(path.name + ".sha256")
    where = "eval.inception_sha256"
    if not expected and pin.is_file():
        expected, where = pin.read_text().strip(), f"the hash pinned in '{pin}' at first use"
    if expected and digest != expected.lower():
        raise EvalError(
            f"'{path}' has SHA-256 {digest}, not {expected} ({where}): a corrupt or different weights file; "
            "replace it (or, if it is the intended file, remove the pin / set eval.inception_sha256)"
        )
    if not expected:
        try:  # atomically: another eval actor may be reading the pin
            tmp = pin.with_name(f".{pin.name}.{os.getpid()}.tmp")
            tmp.write_text(digest + "\n")
            os.replace(tmp, pin)
        except OSError:
            pass  # a read-only location: nothing pinned, the hash is still printed
        print(f"[eval] Inception weights '{path}' SHA-256 {digest} (set eval.inception_sha256 to pin it)", flush=True)
    return digest


def torchscript_extractor(path: str, device: torch.device):
    if not path or not Path(path).is_file():
        raise EvalError(f"eval.torchscript_path = {path!r}: no such TorchScript file")
    model = torch.jit.load(path, map_location=device).eval()

    def fn(x):
        return model(x.to(device))

    return fn, clean_resize()


class FeatureClassifier(nn.Module):
    """Two conv blocks and a 128-d penultimate layer; ``features`` is what FID compares."""

    def __init__(self, channels: int, resolution: int, num_classes: int, width: int = 32):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1),
            nn.SiLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.SiLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * width * (resolution // 4) ** 2, 128),
            nn.SiLU(),
        )
        self.head = nn.Linear(128, num_classes)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.body(x))


def classifier_cache_path(cfg: Config, cache_dir: Path) -> Path:
    d = cfg.data
    key = f"{d.dataset}-{d.path}-{d.resolution}-{d.channels}"
    if files := data_fingerprint(cfg):
        key += f"-{files}"
    return (
        cache_dir
        / f"classifier-{d.dataset}-{d.resolution}px-{d.channels}ch-{hashlib.sha1(key.encode()).hexdigest()[:8]}.pt"
    )


def train_classifier(
    cfg: Config, epochs: int = 15, seed: int = 0, progress: bool = False
) -> tuple[FeatureClassifier, float]:
    """Fit the feature classifier on the dataset's labels; returns it and its held-out accuracy (last 10%).
    ``progress``: show progress over the epochs."""

    ds = build_dataset(cfg)
    # all images, or a random CLASSIFIER_MAX_IMAGES of them: they are held in memory while it trains
    subset = None
    if len(ds) > CLASSIFIER_MAX_IMAGES:
        subset = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:CLASSIFIER_MAX_IMAGES]
    xs, ys = zip(*iter_batches(ds, 1024, None if subset is None else subset.tolist()), strict=True)
    x, y = torch.cat(xs), torch.cat(ys)
    if y.min() < 0:
        raise EvalError(f"eval.features = 'classifier' needs a labelled dataset; {cfg.data.dataset!r} has no labels")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    n_val = max(1, len(x) // 10)
    val, train = perm[:n_val], perm[n_val:]
    torch.manual_seed(seed)
    net = FeatureClassifier(cfg.data.channels, cfg.data.resolution, int(y.max()) + 1)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    desc = f"eval: training the {cfg.data.dataset} feature classifier"
    for _ in show_progress(range(epochs), desc=desc, unit="epochs", enabled=progress):
        for idx in train[torch.randperm(len(train), generator=g)].split(64):
            loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        accuracy = (net(x[val]).argmax(1) == y[val]).float().mean().item()
    return net.eval(), accuracy


def classifier_extractor(cfg: Config, device: torch.device, cache_dir: Path, progress: bool = False):
    """The cached feature classifier of this dataset (trained on first use, with ``progress`` shown or not)."""
    path = classifier_cache_path(cfg, cache_dir)
    if path.is_file():
        state = torch.load(path, map_location="cpu", weights_only=True)
        net = FeatureClassifier(cfg.data.channels, cfg.data.resolution, state["head.weight"].shape[0])
        net.load_state_dict(state)
    else:
        net, accuracy = train_classifier(cfg, progress=progress)
        print(f"[eval] trained the {cfg.data.dataset} feature classifier: held-out accuracy {accuracy:.3f}", flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        torch.save(net.state_dict(), tmp)
        tmp.replace(path)
    net = net.to(device).eval()
    channels = cfg.data.channels

    def fn(x):  # B×3×H×W in [0, 255] -> the training range [-1, 1] with the dataset's channels
        x = x.to(device) / 127.5 - 1
        if channels == 1:
            x = x.mean(dim=1, keepdim=True)
        with torch.no_grad():
            return net.features(x)

    return fn, native_resize


def build_extractor(cfg: Config, device: torch.device, cache_dir: Path, progress: bool = False):
    """``(fn, resize)`` for ``eval.features`` (``(None, None)`` for raw); ``progress``: show the classifier's
    training if it is trained here."""
    kind = cfg.eval.features
    if kind == "raw":
        return None, None
    if cfg.data.dataset == "toy2d":
        raise EvalError(f"eval.features = {kind!r} works on images; toy2d needs eval.features = 'raw'")
    if kind == "inception":
        return inception_extractor(cfg, device)
    if kind == "classifier":
        return classifier_extractor(cfg, device, cache_dir, progress)
    return torchscript_extractor(cfg.eval.torchscript_path, device)
