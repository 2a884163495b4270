"""Concept words -> marker tokens -> per-layer encodings, with a fake tokenizer and encoder."""

import pytest
import torch

from multiconcept.samplers.edlora.clip import LAYERWISE_KEY, ConceptTextEncoder, ConceptTokenizer
from multiconcept.samplers.edlora.tokens import (
    find_concept_words,
    layer_variants,
    make_marker,
    replace_placeholder_tokens,
    substitute_placeholder,
)
from multiconcept.samplers.edlora.vocabulary import ConceptEntry, ConceptVocabulary

DIM = 8
LAYERS = 16


def test_finding_words():
    words = ["<cat1>", "<cat2>", "<cat10>", "sks"]
    assert find_concept_words("a <cat1> <cat2>, and <cat10>!", words) == ["<cat1>", "<cat2>", "<cat10>"]
    assert find_concept_words("(<cat1>:1.2) sksx sks", words) == ["<cat1>", "sks"]
    assert find_concept_words("a plain prompt", words) == []
    text, found = substitute_placeholder("a <cat2> and <cat1>", words, "ohwx")
    assert found == ["<cat2>", "<cat1>"] and text.split() == ["a", "ohwx", "and", "ohwx"]


def test_placeholder_replacement_keeps_weights_and_word_ids():
    sections = [[(1, 1.0, 0), (9, 1.2, 1), (5, 1.0, 2), (9, 1.0, 3), (2, 1.0, 0)]]
    m1, m2 = make_marker("c0", "<a>", torch.zeros(DIM)), make_marker("c0", "<b>", torch.ones(DIM))
    out = replace_placeholder_tokens(sections, 9, [m1, m2])
    assert out[0][1] == (m1, 1.2, 1) and out[0][3] == (m2, 1.0, 3) and out[0][2] == (5, 1.0, 2)
    assert replace_placeholder_tokens(sections, 9, [m1]) is None  # count differs: placeholder was in the prompt


# --- a tiny stand-in for ComfyUI's SD1 tokenizer/encoder, with the same data shapes -----------------

VOCAB = {w: i for i, w in enumerate(["<start>", "<end>", "a", "photo", "of", "on", "sofa", "ohwx", "httr", "big"], 1)}
START, END, T = VOCAB["<start>"], VOCAB["<end>"], 12


class FakeTokenizer:
    def tokenize_with_weights(self, text, return_word_ids=False, **kwargs):
        ids = [VOCAB[w] for w in text.replace(",", " ").split()]
        section = [(START, 1.0)] + [(i, 1.0) for i in ids] + [(END, 1.0)]
        section += [(END, 1.0)] * (T - len(section))
        return {"l": [section]}

    def untokenize(self, pairs):
        return "delegated"


class FakeEncoder:
    """Encodes like a causal transformer: position j's output depends on tokens 0..j."""

    def __init__(self):
        self.table = torch.randn(32, DIM, generator=torch.Generator().manual_seed(0))
        self.calls = 0

    def embed(self, tok):
        return tok["data"].float() if isinstance(tok, dict) else self.table[tok]

    def encode_token_weights(self, pairs):
        self.calls += 1
        outs = []
        for section in pairs["l"]:
            x = torch.stack([self.embed(t) for t, *_ in section])
            outs.append(torch.tanh(torch.cumsum(x, dim=0))[None])
        cond = torch.cat(outs, dim=1)
        return cond, cond[:, 0]


@pytest.fixture
def vocab():
    gen = torch.Generator().manual_seed(1)
    emb = {w: {"l": torch.randn(LAYERS, DIM, generator=gen)} for w in ("<cat1>", "<cat2>")}
    return ConceptVocabulary().with_entry(ConceptEntry(uid="c0:cat", words=("<cat1>", "<cat2>"), embeddings=emb))


def test_prompt_without_concept_words_is_passed_through(vocab):
    base_tok, base_enc = FakeTokenizer(), FakeEncoder()
    tok, enc = ConceptTokenizer(base_tok, vocab), ConceptTextEncoder(base_enc, vocab)
    tokens = tok.tokenize_with_weights("a photo of a sofa")
    assert tokens == base_tok.tokenize_with_weights("a photo of a sofa")
    cond, pooled = enc.encode_token_weights(tokens)
    ref, _ = FakeEncoder().encode_token_weights(tokens)
    assert torch.equal(cond, ref) and base_enc.calls == 1
    assert tok.untokenize(None) == "delegated"  # everything else is delegated


def test_layer_i_context_is_the_prompt_encoded_with_layer_i_tokens(vocab):
    base_enc = FakeEncoder()
    tok, enc = ConceptTokenizer(FakeTokenizer(), vocab), ConceptTextEncoder(base_enc, vocab)
    tokens = tok.tokenize_with_weights("a photo of <cat1> <cat2> on a sofa")
    cond, pooled, extra = enc.encode_token_weights(tokens)
    assert base_enc.calls == 1  # all 16 layers (+ the averaged variant) in one batched call
    lw = extra[LAYERWISE_KEY]
    assert lw.layers.shape == (1, LAYERS, T, DIM) and lw.reference is cond
    emb = {w: vocab.owner_of(w).embeddings[w]["l"] for w in ("<cat1>", "<cat2>")}
    plain = FakeTokenizer().tokenize_with_weights("a photo of ohwx ohwx on a sofa")["l"][0]
    for layer in range(LAYERS):
        section = list(plain)
        section[4] = ({"type": "embedding", "data": emb["<cat1>"][layer]}, 1.0)
        section[5] = ({"type": "embedding", "data": emb["<cat2>"][layer]}, 1.0)
        expected, _ = FakeEncoder().encode_token_weights({"l": [section]})
        assert torch.allclose(lw.layers[:, layer], expected)
    # positions before the concept words do not depend on them; after them, every layer differs
    assert torch.equal(lw.layers[0, 0, :4], lw.layers[0, 5, :4])
    assert not torch.allclose(lw.layers[0, 0, 4:], lw.layers[0, 5, 4:])
    # the ordinary conditioning uses the layer-averaged embedding
    section = list(plain)
    section[4] = ({"type": "embedding", "data": emb["<cat1>"].mean(0)}, 1.0)
    section[5] = ({"type": "embedding", "data": emb["<cat2>"].mean(0)}, 1.0)
    assert torch.allclose(cond, FakeEncoder().encode_token_weights({"l": [section]})[0])


# --- SDXL: two text encoders ("l" 768 wide, "g" 1280 wide here DIM and 2 * DIM), concatenated per token ----


class FakeSDXLTokenizer(FakeTokenizer):
    def tokenize_with_weights(self, text, return_word_ids=False, **kwargs):
        section = super().tokenize_with_weights(text)["l"][0]
        return {"g": [list(section)], "l": [list(section)]}


class FakeSDXLEncoder:
    """Like ComfyUI's SDXLClipModel: each key encoded on its own (sections concatenated along the tokens),
    then l and g concatenated along the width; pooled output of g's first section."""

    def __init__(self):
        self.l, self.g = FakeEncoder(), FakeEncoder()
        self.g.table = torch.randn(32, 2 * DIM, generator=torch.Generator().manual_seed(5))
        self.calls = 0

    def encode_token_weights(self, pairs):
        self.calls += 1
        l_out, _ = self.l.encode_token_weights({"l": pairs["l"]})
        g_out, _ = self.g.encode_token_weights({"l": pairs["g"]})
        g_pooled = g_out[:, T - 1]  # a stand-in pooled output: the first section's last token
        return torch.cat([l_out, g_out], dim=-1), g_pooled


def test_sdxl_layer_i_context_holds_layer_i_tokens_of_both_encoders_and_pooled_is_layer_0():
    from multiconcept.samplers.edlora import clip as clip_module

    gen = torch.Generator().manual_seed(4)
    emb = {
        w: {"l": torch.randn(70, DIM, generator=gen), "g": torch.randn(70, 2 * DIM, generator=gen)}
        for w in ("<dog1>", "<dog2>")
    }
    vocab = ConceptVocabulary().with_entry(ConceptEntry(uid="c0:dog", words=("<dog1>", "<dog2>"), embeddings=emb))
    base_enc = FakeSDXLEncoder()
    tok, enc = ConceptTokenizer(FakeSDXLTokenizer(), vocab), ConceptTextEncoder(base_enc, vocab)
    cond, pooled, extra = enc.encode_token_weights(tok.tokenize_with_weights("a photo of <dog1> <dog2> on a sofa"))
    # 71 variants of one section, in chunks of SECTIONS_PER_CALL sections per encoder call
    assert base_enc.calls == -(-71 // clip_module.SECTIONS_PER_CALL) > 1
    lw = extra[LAYERWISE_KEY]
    assert lw.layers.shape == (1, 70, T, 3 * DIM) and cond.shape == (1, T, 3 * DIM) and lw.reference is cond

    plain = FakeTokenizer().tokenize_with_weights("a photo of ohwx ohwx on a sofa")["l"][0]

    def encoded(pick):
        sections = {}
        for key in ("l", "g"):
            section = list(plain)
            section[4] = ({"type": "embedding", "data": pick(emb["<dog1>"][key])}, 1.0)
            section[5] = ({"type": "embedding", "data": pick(emb["<dog2>"][key])}, 1.0)
            sections[key] = [section]
        return FakeSDXLEncoder().encode_token_weights(sections)

    for layer in range(70):
        expected, expected_pooled = encoded(lambda e, layer=layer: e[layer])
        assert torch.allclose(lw.layers[:, layer], expected), f"layer {layer}"
        if layer == 0:
            assert torch.equal(pooled, expected_pooled)  # layer 0's pooled output, as ED-LoRAs are trained
    assert not torch.allclose(lw.layers[0, 0, 4:, DIM:], lw.layers[0, 1, 4:, DIM:])  # the g half differs too
    # the ordinary conditioning: both encoders with the layer-averaged embeddings
    assert torch.allclose(cond, encoded(lambda e: e.mean(0))[0])


def test_placeholder_already_in_prompt_falls_back_to_next_candidate(vocab):
    tok = ConceptTokenizer(FakeTokenizer(), vocab)
    tokens = tok.tokenize_with_weights("ohwx <cat1> big")
    items = [t for t, *_ in tokens["l"][0]]
    assert items[1] == VOCAB["ohwx"]  # the user's own word survives
    assert isinstance(items[2], dict) and items[2]["multiconcept_word"] == ("c0:cat", "<cat1>")


def test_layer_variants_layout():
    marker = make_marker("u", "<w>", torch.zeros(DIM))
    sections = [[(1, 1.0), (marker, 1.0)], [(2, 1.0)]]
    out = layer_variants(sections, 3, lambda ref, key, layer: torch.full((DIM,), float(layer)), "l")
    assert len(out) == 2 * (3 + 1)
    assert out[0] == sections[0] and out[1] == sections[1]
    assert out[2 + 2 * 1][1][0]["data"][0] == 1.0  # variant for layer 1, first section, the concept token
    assert "multiconcept_word" not in out[2][1][0]


def test_word_clashes_are_renamed(vocab):
    assert vocab.free_words(("<cat1>", "<dog1>")) == ("<cat1_2>", "<dog1>")
    assert vocab.free_words(("sks",)) == ("sks",)
    with pytest.raises(ValueError, match="already in use"):
        vocab.with_entry(ConceptEntry(uid="c1:x", words=("<cat2>",), embeddings={"<cat2>": {"l": torch.zeros(1, DIM)}}))
