"""Model families side by side: text-query encode latency and image throughput on one CPU.

Each family's smallest real architecture, with random weights (they time the same as trained
ones), through the product's own loaders and Encoder, in one run:
- open_clip ViT-B-32 (the default model; the baseline of the ratios);
- Chinese-CLIP RN50 (cn-clip:RN50: ResNet-50 and the 3-layer RoBERTa-wwm-ext "RBT3") and
  ViT-B-16 (cn-clip:ViT-B-16, the usual choice: ViT-B/16 and RoBERTa-wwm-ext-base);
- a transformers CLIPModel folder of the ViT-B/32 shape (hf:FOLDER), with OpenAI CLIP's own BPE
  vocabulary rebuilt from the file open_clip ships, so its tokens are the real ones;
- open_clip's multilingual `xlm-roberta-base-ViT-B-32` (XLM-R base as its text tower) and
  SigLIP2's `ViT-B-16-SigLIP2`, through copies of open_clip's own configs whose Hugging Face
  names point at local folders: XLM-R base's configuration written out, and cn_clip's Chinese
  BERT vocabulary standing in for their tokenizers (which live on the hub). The towers are the
  real ones; XLM-R's text is trimmed as it is with its own tokenizer, SigLIP2's always runs its
  full 64-token context, so the stand-in tokenizer changes the token count a little, not the
  cost's shape.
Text: p50 over single queries as the API encodes them (trimmed where exact); English queries
for open_clip and hf, Chinese ones for Chinese-CLIP, both in turn for the multilingual models.
Images: preprocessed 224-px batches of 32.
Prints ONE JSON line. Usage: python bench/model_families.py [QUERIES] [IMAGES]
"""

from __future__ import annotations

import gzip
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retrieval.models.encoder import Encoder, load_encoder
from retrieval.models.identity import ModelSpec

ENGLISH = [
    "a dog on a beach",
    "red car parked in the snow",
    "a photo of my grandmother's kitchen",
    "sunset over the mountains",
    "invoice",
    "two cats sleeping on a sofa",
]
CHINESE = [
    "一只在海滩上的狗",
    "雪地里的红色汽车",
    "奶奶的厨房",
    "山上的日落",
    "发票",
    "沙发上睡觉的两只猫",
]


def _openai_bpe_tokenizer(folder: Path) -> None:
    """Write vocab.json + merges.txt of OpenAI CLIP's tokenizer, rebuilt from open_clip's BPE
    merges file exactly as its SimpleTokenizer builds its vocabulary."""
    import open_clip.tokenizer as oct
    from transformers import CLIPTokenizer

    lines = gzip.open(oct.default_bpe(), "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    symbols = list(oct.bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n"
    )
    tokenizer = CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77
    )
    tokenizer.save_pretrained(folder)


def _hf_clip_folder(folder: Path) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(0)
    CLIPModel(CLIPConfig()).save_pretrained(folder)  # the defaults are ViT-B/32's shape
    CLIPImageProcessor().save_pretrained(folder)
    _openai_bpe_tokenizer(folder)
    return folder


def _hub_free_open_clip_configs(root: Path) -> Path:
    """open_clip's xlm-roberta-base-ViT-B-32 and ViT-B-16-SigLIP2 configs, with their Hugging Face
    tokenizer and text-tower names pointing at local folders (see the module docstring)."""
    import open_clip
    from cn_clip.clip.bert_tokenizer import default_vocab
    from transformers import BertTokenizer, XLMRobertaConfig

    tokenizer = root / "tokenizer"
    BertTokenizer(default_vocab(), model_max_length=512).save_pretrained(str(tokenizer))
    xlmr = root / "xlm-roberta-base"
    XLMRobertaConfig(  # xlm-roberta-base's shape; the ids follow the stand-in tokenizer's
        vocab_size=250002,
        max_position_embeddings=514,
        type_vocab_size=1,
        layer_norm_eps=1e-5,
        pad_token_id=0,
        bos_token_id=101,
        eos_token_id=102,
    ).save_pretrained(str(xlmr))
    configs = root / "configs"
    configs.mkdir()
    for name in ("xlm-roberta-base-ViT-B-32", "ViT-B-16-SigLIP2"):
        config = open_clip.get_model_config(name)
        assert config is not None, name
        text = config["text_cfg"]
        text["hf_tokenizer_name"] = str(tokenizer)
        if "hf_model_name" in text:
            text["hf_model_name"] = str(xlmr)
        (configs / f"{name}-local.json").write_text(json.dumps(config))
    return configs


def _text_p50(encoder: Encoder, queries: list[str], rounds: int) -> float:
    for query in queries:  # warm-up: first calls page the weights in and set up kernels
        encoder.encode_texts([query])
    times = []
    for n in range(rounds):
        started = time.perf_counter()
        encoder.encode_texts([queries[n % len(queries)]])
        times.append((time.perf_counter() - started) * 1000)
    return float(np.percentile(times, 50))


def _images_per_second(encoder: Encoder, count: int, batch: int = 32) -> float:
    size = encoder.identity.image_size
    pixels = torch.randn(batch, 3, size, size)
    encoder.encode_image_tensors(pixels)  # warm-up
    started = time.perf_counter()
    done = 0
    while done < count:
        encoder.encode_image_tensors(pixels)
        done += batch
    return done / (time.perf_counter() - started)


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 30
    images = int(sys.argv[2]) if len(sys.argv) > 2 else 128
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="clipsearch-bench-") as tmp:
        models = [
            ("open_clip ViT-B-32", ModelSpec("ViT-B-32", "none", device="cpu"), ENGLISH),
            ("cn-clip:RN50", ModelSpec("cn-clip:RN50", "none", device="cpu"), CHINESE),
            ("cn-clip:ViT-B-16", ModelSpec("cn-clip:ViT-B-16", "none", device="cpu"), CHINESE),
            (
                "hf CLIPModel ViT-B/32",
                ModelSpec(f"hf:{_hf_clip_folder(Path(tmp) / 'hf-clip')}", "none", device="cpu"),
                ENGLISH,
            ),
        ]
        configs = _hub_free_open_clip_configs(Path(tmp))
        for label, name in (
            ("open_clip xlm-roberta-base-ViT-B-32", "xlm-roberta-base-ViT-B-32-local"),
            ("open_clip ViT-B-16-SigLIP2", "ViT-B-16-SigLIP2-local"),
        ):
            spec = ModelSpec(name, "none", device="cpu", config_dir=configs)
            models.append(
                (label, spec, [q for pair in zip(CHINESE, ENGLISH, strict=True) for q in pair])
            )
        for label, spec, queries in models:
            encoder = load_encoder(spec)
            params = sum(p.numel() for p in encoder.model.parameters())
            results[label] = {
                "dim": encoder.identity.dim,
                "image_size": encoder.identity.image_size,
                "params_m": round(params / 1e6, 1),
                "text_p50_ms": round(_text_p50(encoder, queries, rounds), 2),
                "images_per_s": round(_images_per_second(encoder, images), 2),
                "trims_text": encoder.backend.trims_exactly(),
            }
            del encoder
    base = results["open_clip ViT-B-32"]
    for entry in results.values():
        entry["text_vs_vit_b_32"] = round(entry["text_p50_ms"] / base["text_p50_ms"], 2)
        entry["images_vs_vit_b_32"] = round(entry["images_per_s"] / base["images_per_s"], 2)
    print(
        json.dumps(
            {
                "bench": "model_families",
                "threads": torch.get_num_threads(),
                "queries": rounds,
                "images": images,
                "models": results,
            }
        )
    )


if __name__ == "__main__":
    main()
