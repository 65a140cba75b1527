import torch
from transformers import AutoModel, AutoTokenizer


def test_real_backbone_embeds_paraphrases_closer_than_unrelated_text(real_backbone):
    """all-MiniLM-L6-v2 is a sentence embedder: mean-pooled outputs rank meaning, not words."""
    tokenizer = AutoTokenizer.from_pretrained(real_backbone)
    model = AutoModel.from_pretrained(real_backbone).eval()
    assert sum(p.numel() for p in model.parameters()) == 22_713_216
    texts = [
        "The cat is sleeping on the sofa.",
        "A kitten naps on the couch.",
        "Stock markets fell sharply after the interest rate decision.",
    ]
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**encoded).last_hidden_state
    mask = encoded["attention_mask"].unsqueeze(-1).float()
    embeddings = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    similarity = embeddings @ embeddings.T
    assert similarity[0, 1] > 0.5
    assert similarity[0, 1] > similarity[0, 2] + 0.4
