"""The contrastive objectives of fine-tuning, and which one a training set gets.

- `clip`: open_clip's `ClipLoss`. Every other caption in the batch is a negative, which is
  right for unique captions and wrong for repeated ones: two pictures captioned "a red circle"
  are then pushed apart, and training plateaus (near 0.5 zero-shot accuracy on the shapes).
- `class-aware`: each image is scored against the batch's DISTINCT captions, and every caption
  of its group (same class, else same caption text) is a positive; each caption's positives are
  all the images of its group. With unique captions and no classes it equals `clip`.
- `sigmoid`: SigLIP's pairwise sigmoid loss, for models that score with a sigmoid and a bias.
  Every (image, distinct caption) pair of the batch is its own binary question, positive when
  they share a group, so repeated captions are handled as class-aware handles them. A softmax
  objective would unlearn such a model's calibration (its bias), so it is the only choice there.
`auto` picks sigmoid for a sigmoid model, otherwise class-aware whenever a group occurs more
than once in the training set, else clip.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from retrieval.training.data import TrainingSample

LOSSES = ("auto", "clip", "class-aware", "sigmoid")
SOFTMAX_LOSSES = ("clip", "class-aware")


def class_aware_loss(
    image_features: torch.Tensor,
    caption_features: torch.Tensor,
    image_groups: torch.Tensor,
    caption_groups: torch.Tensor,
    logit_scale: torch.Tensor,
    image_pairs: float = 0.0,
) -> torch.Tensor:
    """Symmetric contrastive loss over DISTINCT captions with group-level positives.

    image_features (B, D) and caption_features (U, D) are unit vectors; image_groups (B,) and
    caption_groups (U,) are group ids. Image i's target is spread evenly over the captions of
    its group; caption u's target over the images of its group. `image_pairs` > 0 adds that
    weight of `image_pair_loss`.
    """
    logits = logit_scale * image_features @ caption_features.T  # (B, U)
    positive = (image_groups[:, None] == caption_groups[None, :]).to(logits.dtype)
    image_targets = positive / positive.sum(dim=1, keepdim=True)
    caption_targets = positive.T / positive.T.sum(dim=1, keepdim=True)
    loss = (F.cross_entropy(logits, image_targets) + F.cross_entropy(logits.T, caption_targets)) / 2
    if image_pairs:
        loss = loss + image_pairs * image_pair_loss(image_features, image_groups, logit_scale)
    return loss


def sigmoid_loss(
    image_features: torch.Tensor,
    caption_features: torch.Tensor,
    image_groups: torch.Tensor,
    caption_groups: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
) -> torch.Tensor:
    """SigLIP's loss over DISTINCT captions: -log sigmoid(±(scale·cos + bias)) summed over the
    captions and averaged over the images, + for the pairs of one group and - for the others.

    Shapes as in `class_aware_loss`. With unique captions it is the SigLIP paper's loss (the
    diagonal positive); the sum over captions, not a mean, is what the paper normalises by.
    """
    logits = logit_scale * image_features @ caption_features.T + logit_bias  # (B, U)
    sign = (image_groups[:, None] == caption_groups[None, :]).to(logits.dtype) * 2 - 1
    return -F.logsigmoid(sign * logits).sum(dim=1).mean()


def image_pair_loss(
    image_features: torch.Tensor, image_groups: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Supervised-contrastive term between images: the same group's images are positives.

    Text-image terms alone leave each class's images in a loose cone around its caption, so
    two classes with close captions ("a green star", "a green triangle") can overlap in
    image-to-image search. Images without another of their group in the batch add nothing.
    """
    count = image_features.shape[0]
    logits = logit_scale * image_features @ image_features.T
    itself = torch.eye(count, dtype=torch.bool, device=logits.device)
    logits = logits.masked_fill(itself, float("-inf"))
    positive = (image_groups[:, None] == image_groups[None, :]) & ~itself
    rows = positive.any(dim=1)
    if not bool(rows.any()):
        return logits.new_zeros(())
    targets = positive[rows].to(logits.dtype)
    targets = targets / targets.sum(dim=1, keepdim=True)
    log_probs = F.log_softmax(logits[rows], dim=1).masked_fill(itself[rows], 0.0)
    return -(targets * log_probs).sum(dim=1).mean()


def clip_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """open_clip's ClipLoss (single process): the i-th caption is the i-th image's only positive."""
    from open_clip.loss import ClipLoss

    return ClipLoss()(image_features, text_features, logit_scale)


def group_keys(samples: Sequence[TrainingSample]) -> list[str]:
    # A class groups its samples whatever the caption; without one, identical text does.
    return [f"class:{s.label}" if s.label is not None else f"text:{s.caption}" for s in samples]


def choose_loss(config_loss: str, samples: Sequence[TrainingSample], sigmoid: bool) -> str:
    """The loss to train with: the configured one, or `auto`'s pick for this model and data."""
    if config_loss != "auto":
        return config_loss
    if sigmoid:
        return "sigmoid"
    keys = group_keys(samples)
    return "class-aware" if len(set(keys)) < len(keys) else "clip"
