"""Load a decoded model folder with transformers and embed a few sentences.

Usage: python scripts/embed_decoded.py ORIGINAL_DIR DECODED_DIR
Prints the cosine between the original and the decoded sentence embeddings
(mean pooling + L2 normalisation, as sentence-transformers does).
"""

import sys

import torch
from transformers import AutoModel, AutoTokenizer

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Compression trades bytes for fidelity.",
    "A sentence embedding maps text to a vector.",
]


def embed(folder: str) -> torch.Tensor:
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    batch = tok(SENTENCES, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


def main() -> None:
    orig, dec = embed(sys.argv[1]), embed(sys.argv[2])
    cos = (orig * dec).sum(-1)
    print(f"decoded model loads in transformers: {tuple(dec.shape)} sentence embeddings")
    for s, c in zip(SENTENCES, cos.tolist()):
        print(f"  cosine to original {c:.4f}  {s}")


if __name__ == "__main__":
    main()
