"""Where a model's weights come from (hub repo and file, size, sha256), and what to run to get
them onto a machine: the text every "weights unavailable" error ends with."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from retrieval.models.cache import hub_cache_dir, repo_folder_name
from retrieval.models.recommended import RecommendedModel, find_recommended


@dataclass(frozen=True)
class WeightsSource:
    """The hub files that hold one model's weights, and the other repos it reads."""

    model: str  # CLIPSEARCH_MODEL
    pretrained: str  # CLIPSEARCH_PRETRAINED
    repo: str
    files: tuple[str, ...]  # in order of preference; () = the repo's folder (an hf: model)
    needs: tuple[str, ...] = ()  # repos of a tokenizer or text-tower config
    size: int | None = None  # exact bytes of files[0], where recorded
    approx_size: int | None = None  # fp32 bytes, where the parameters are counted
    sha256: str | None = None  # of files[0], where recorded
    url: str = ""  # a plain download URL, for weights not on the hub

    @property
    def recommended(self) -> RecommendedModel | None:
        return find_recommended(self.model, self.pretrained)

    @property
    def fetch_name(self) -> str:
        """What `clipsearch models fetch` takes for this model."""
        row = self.recommended
        if row is not None:
            return row.name
        pretrained = f" --pretrained {self.pretrained}" if self.pretrained else ""
        return f"{self.model}{pretrained}"

    def describe(self) -> str:
        """One sentence: which files of which repo, how large, which sha256."""
        if self.files:
            what = f"the file {self.files[0]}"
            if len(self.files) > 1:
                what += f" (or {', '.join(self.files[1:])})"
            where = f"{what} of the Hugging Face repo {self.repo}"
        else:
            where = f"the folder of the Hugging Face repo {self.repo}"
        if self.size is not None:
            size = f"{self.size:,} bytes"
        elif self.approx_size is not None:
            size = f"about {self.approx_size / 1e6:,.0f} MB"
        else:
            size = "size not recorded"
        sha = f"sha256 {self.sha256}" if self.sha256 else "sha256 not recorded"
        needs = f"; it also reads {', '.join(self.needs)} (tokenizer/config)" if self.needs else ""
        return f"They are {where} ({size}, {sha}){needs}."

    def howto(self, cache_dir: Path | None) -> str:
        """The steps that get these weights here."""
        folder = hub_cache_dir(cache_dir) / f"models--{repo_folder_name(self.repo)}"
        lines = [
            self.describe(),
            "To get them:",
            f"  * with internet access: clipsearch models fetch {self.fetch_name}  (it fills "
            f"{folder})",
            "  * for a machine without it: run that where there is internet, copy the folder it "
            "prints over, and run there: clipsearch models import FOLDER",
        ]
        if self.files:
            url = f"https://huggingface.co/{self.repo}/resolve/main/{self.files[0]}"
            lines.append(
                f"  * or download {url} and run: clipsearch models import FILE "
                f"--name {self.fetch_name}"
            )
        return "\n".join(lines)


def source_for(model: str, pretrained: str) -> WeightsSource | None:
    """The source of a recommended model, from the table alone (no family package needed)."""
    row = find_recommended(model, pretrained)
    if row is None:
        return None
    return from_row(row)


def from_row(row: RecommendedModel) -> WeightsSource:
    return WeightsSource(
        model=row.model,
        pretrained=row.pretrained,
        repo=row.weights.repo,
        files=row.weights.files,
        needs=tuple(need.repo for need in row.needs),
        size=row.weights.size,
        approx_size=row.fp32_bytes,
        sha256=row.weights.sha256,
    )
