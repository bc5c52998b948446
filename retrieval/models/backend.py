"""The seam between clipsearch and a model family: what every family's loaded model provides.

The `Encoder` wraps one `ModelBackend` and owns everything the families share: the lock, moving
batches to the device, L2 normalisation, batching many texts. A backend only knows its family:
how to load, preprocess, tokenize and run its towers, its identity and its score rule. A new
family is one module in `retrieval/models/families/` with a `load(spec, device, precision)`
function, and one line in `FAMILY_MODULES`.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from PIL import Image

from retrieval.errors import ConfigError
from retrieval.models.identity import CN_CLIP, HF, OPEN_CLIP, ModelIdentity, ModelSpec

if TYPE_CHECKING:  # torch is imported by the families that run in it, never here (see exported/)
    import torch


@dataclass(frozen=True)
class Family:
    module: str  # under retrieval.models.families
    extra: str | None  # the pip extra that installs its packages (None: always installed)
    packages: tuple[str, ...]  # the optional top-level packages it imports


FAMILY_MODULES: dict[str, Family] = {
    OPEN_CLIP: Family("openclip", None, ()),
    CN_CLIP: Family("chinese_clip", "chinese", ("cn_clip",)),
    HF: Family("hf", "hf", ("transformers", "tokenizers")),
}


@dataclass(frozen=True)
class TokenBatch:
    """Token ids (n, L) and, for towers that read one, the attention mask (1 = a real token):
    torch tensors from a torch backend, int64 numpy arrays from an export's tokenizer."""

    ids: Any  # torch.Tensor, or numpy.ndarray
    mask: Any = None

    def to(self, device: str) -> TokenBatch:
        """On a torch device (torch tensors only)."""
        mask = self.mask.to(device) if self.mask is not None else None
        return TokenBatch(self.ids.to(device), mask)

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def columns(self, length: int) -> TokenBatch:
        """The first `length` columns (tokens) of every row."""
        mask = self.mask[:, :length] if self.mask is not None else None
        return TokenBatch(self.ids[:, :length], mask)


@dataclass(frozen=True)
class ExportTowers:
    """Each tower as a module of tensors alone, what an exporter (ONNX) traces.

    `image(pixels)` and `text(ids)`, or `text(ids, mask)` where `text_mask`, run any batch size
    and, for text, any number of columns up to the full context; their outputs are those of
    `encode_image` and `encode_text(trim=False)` on the same inputs."""

    image: torch.nn.Module
    text: torch.nn.Module
    text_mask: bool


@dataclass(frozen=True)
class ScoreRule:
    """How scaled cosines become label probabilities: a softmax over the labels (CLIP), or an
    independent sigmoid per label with a bias (SigLIP)."""

    logit_scale: float
    logit_bias: float | None = None  # None: softmax

    @property
    def is_sigmoid(self) -> bool:
        return self.logit_bias is not None


class ModelBackend(ABC):
    """One loaded model of one family, in eval mode on its device."""

    def __init__(
        self,
        model: torch.nn.Module,  # an export's backend has none (see exported.backend)
        preprocess: Callable[[Image.Image], Any],
        identity: ModelIdentity,
    ) -> None:
        self.model = model
        self.preprocess = preprocess
        self.identity = identity

    @abstractmethod
    def tokenize(self, texts: Sequence[str]) -> TokenBatch:
        """Tokens of the texts, padded to the tower's full context. Called from several threads
        at once (outside the encoder's lock), so it must be thread-safe."""

    @abstractmethod
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Image features (unnormalised) of a preprocessed batch already on the device."""

    @abstractmethod
    def encode_text(self, tokens: TokenBatch, *, trim: bool) -> torch.Tensor:
        """Text features (unnormalised). With `trim`, a backend whose result cannot change may
        run only up to the longest real token instead of the full context (`trimmed`)."""

    def trimmed(self, tokens: TokenBatch) -> TokenBatch:
        """The fewest leading columns of `tokens` that give the same features as all of them
        (all of them for a tower that reads its padding). Runtimes other than torch trim with
        it, so that every runtime runs the same columns."""
        return tokens

    @abstractmethod
    def export_towers(self) -> ExportTowers:
        """The towers as modules an exporter can trace (see `ExportTowers`)."""

    @abstractmethod
    def score_rule(self) -> ScoreRule:
        """The model's logit scale (and bias, for sigmoid models)."""

    def trims_exactly(self) -> bool:
        """Whether `encode_text(trim=True)` runs a shorter context than the full one."""
        return False

    # --- fine-tuning (`retrieval.training.finetune`) -----------------------------------------
    # encode_image and encode_text are differentiable when called outside inference mode.

    @abstractmethod
    def tower(self, parameter: str) -> str:
        """Which part a parameter (a name from `model.named_parameters()`) belongs to:
        "image", "text", or "shared" (the logit scale and bias)."""

    def stack(self, pixels: Sequence[Any]) -> Any:
        """One batch (N, 3, H, W) of preprocessed images, as the towers' runtime takes it."""
        import torch

        return torch.stack(list(pixels))

    def logit_scale_parameter(self) -> torch.nn.Parameter:
        """The learnable log of the logit scale (training clamps it at ln 100)."""
        import torch

        parameter = getattr(self.model, "logit_scale", None)
        if not isinstance(parameter, torch.nn.Parameter):
            raise TypeError(f"{type(self.model).__name__} has no logit_scale parameter")
        return parameter

    def logit_bias_parameter(self) -> torch.nn.Parameter | None:
        """The learnable logit bias of a sigmoid (SigLIP) model; None for a softmax model."""
        import torch

        parameter = getattr(self.model, "logit_bias", None)
        return parameter if isinstance(parameter, torch.nn.Parameter) else None

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """The weights a fine-tuning run saves: a state dict that this family's `load` accepts
        back as `pretrained` (saved as {"state_dict": ..., "clipsearch": meta})."""
        return self.model.state_dict()


def load_backend(spec: ModelSpec, device: str, precision: str) -> ModelBackend:
    """Load `spec` through its family's module; ConfigError naming the extra when the family's
    package is not installed."""
    family = FAMILY_MODULES[spec.family]
    try:
        module: Any = importlib.import_module(f"retrieval.models.families.{family.module}")
    except ImportError as exc:
        missing = (exc.name or "").split(".")[0]
        if missing not in family.packages:
            raise
        raise ConfigError(
            "CLIPSEARCH_MODEL",
            f"{spec.name} is a {spec.family} model, whose package {missing} is not "
            f"installed; install it with: pip install 'clipsearch[{family.extra}]'",
        ) from None
    backend: ModelBackend = module.load(spec, device, precision)
    return backend
