"""Tiny random-init LLMs (BERT, DistilBERT, RoBERTa families) with tokenizers, saved to a folder — no network.

``make_tiny_llm("bert", folder)`` returns a folder that ``featurestore.load_llm`` (and ``AutoModel``) loads like a
real model. Configs and vocabularies are built in code; tokenizers are built with ``vocab=`` (transformers 5
ignores ``vocab_file=``). The same seed gives the same weights.
"""

from __future__ import annotations

import string
from pathlib import Path

FAMILIES = ("bert", "distilbert", "roberta")
WORDS = ("the", "a", "of", "and", "for", "with", "glue", "tape", "saw", "drill", "blade", "inch", "pack",
         "steel", "glove", "mask", "lab", "tube", "filter", "industrial", "scientific", "tools")


def _wordpiece_vocab() -> dict[str, int]:
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    tokens += chars + [f"##{c}" for c in chars] + list(WORDS)
    return {token: i for i, token in enumerate(dict.fromkeys(tokens))}


def _byte_level_vocab() -> dict[str, int]:
    from tokenizers.pre_tokenizers import ByteLevel

    tokens = ["<s>", "<pad>", "</s>", "<unk>", "<mask>", *sorted(ByteLevel.alphabet())]
    return {token: i for i, token in enumerate(dict.fromkeys(tokens))}


def make_tiny_llm(family: str, folder: Path, n_layers: int = 2, hidden: int = 32, *, seed: int = 0,
                  max_positions: int = 128) -> Path:
    """Save a random-init model of FAMILY (bert, distilbert, roberta) and its fast tokenizer to FOLDER."""
    import torch
    from transformers import (
        BertConfig,
        BertModel,
        BertTokenizer,
        DistilBertConfig,
        DistilBertModel,
        DistilBertTokenizer,
        RobertaConfig,
        RobertaModel,
        RobertaTokenizer,
    )
    from transformers.utils import logging as hf_logging

    if family not in FAMILIES:
        raise ValueError(f"family {family!r}: choose one of {', '.join(FAMILIES)}")
    heads = 2 if hidden % 2 == 0 else 1
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if family == "roberta":
        vocab = _byte_level_vocab()
        tokenizer = RobertaTokenizer(vocab=vocab, merges=[])
        config = RobertaConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=n_layers,
                               num_attention_heads=heads, intermediate_size=2 * hidden,
                               max_position_embeddings=max_positions + 2, pad_token_id=vocab["<pad>"],
                               bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"], type_vocab_size=1)
        model = RobertaModel(config, add_pooling_layer=False)
    elif family == "distilbert":
        vocab = _wordpiece_vocab()
        tokenizer = DistilBertTokenizer(vocab=vocab)
        config = DistilBertConfig(vocab_size=len(vocab), dim=hidden, n_layers=n_layers, n_heads=heads,
                                  hidden_dim=2 * hidden, max_position_embeddings=max_positions,
                                  pad_token_id=vocab["[PAD]"])
        model = DistilBertModel(config)
    else:
        vocab = _wordpiece_vocab()
        tokenizer = BertTokenizer(vocab=vocab)
        config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=n_layers,
                            num_attention_heads=heads, intermediate_size=2 * hidden,
                            max_position_embeddings=max_positions, pad_token_id=vocab["[PAD]"])
        model = BertModel(config, add_pooling_layer=False)
    tokenizer.model_max_length = max_positions
    hf_logging.disable_progress_bar()
    try:
        model.eval().save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    finally:
        hf_logging.enable_progress_bar()
    return folder
