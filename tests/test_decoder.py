import dataclasses

import pytest
import torch
from recbole.model.sequential_recommender.sasrec import SASRec

from backbones.recbole_adapter import build_recbole_model
from model.decoder import DecoderConfig, TaesarDecoder, gather_states, target_states

N_ITEMS = 30
CONFIG = DecoderConfig(n_items=N_ITEMS, max_len=16, hidden_size=32, inner_size=48, n_layers=2, n_heads=2)


def right_padded(lengths: list[int], L: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(1, N_ITEMS + 1, (len(lengths), L), generator=g)
    return items * (torch.arange(L) < torch.tensor(lengths)[:, None])


def make_decoder(seed: int = 0) -> TaesarDecoder:
    torch.manual_seed(seed)
    return TaesarDecoder(CONFIG).eval()


def recbole_sasrec(config: DecoderConfig) -> SASRec:
    return build_recbole_model(SASRec, config.n_items, config.max_len, config.recbole_params())


def from_recbole(state: dict[str, torch.Tensor], n_layers: int) -> dict[str, torch.Tensor]:
    """RecBole SASRec state dict -> TaesarDecoder state dict (q, k, v projections concatenated)."""
    out = {
        "item_emb.weight": state["item_embedding.weight"],
        "pos_emb.weight": state["position_embedding.weight"],
        "ln_emb.weight": state["LayerNorm.weight"],
        "ln_emb.bias": state["LayerNorm.bias"],
    }
    for i in range(n_layers):
        src, dst = f"trm_encoder.layer.{i}.", f"blocks.{i}."
        attn, ffn = src + "multi_head_attention.", src + "feed_forward."
        for p in ("weight", "bias"):
            qkv = [state[f"{attn}{name}.{p}"] for name in ("query", "key", "value")]
            out[dst + "qkv." + p] = torch.cat(qkv)
            out[dst + "attn_out." + p] = state[attn + "dense." + p]
            out[dst + "ln_attn." + p] = state[attn + "LayerNorm." + p]
            out[dst + "ffn_in." + p] = state[ffn + "dense_1." + p]
            out[dst + "ffn_out." + p] = state[ffn + "dense_2." + p]
            out[dst + "ln_ffn." + p] = state[ffn + "LayerNorm." + p]
    return out


def test_matches_recbole_sasrec():
    torch.manual_seed(0)
    reference = recbole_sasrec(CONFIG).eval()
    # N(0, 0.02) weights keep every pre-activation near 0, where e.g. erf and tanh GELU agree to
    # 1e-7: draw every parameter, biases and LayerNorm included, at a scale where details show
    with torch.no_grad():
        for p in reference.parameters():
            p.normal_(std=0.5)
    decoder = TaesarDecoder(CONFIG)
    decoder.load_state_dict(from_recbole(reference.state_dict(), CONFIG.n_layers))
    decoder.eval()
    lengths = torch.tensor([16, 9, 1, 4])
    items = right_padded(lengths.tolist(), L=16)

    with torch.no_grad():
        hidden = decoder.encode(items)
        # RecBole's forward returns the state at item_seq_len - 1: ask it for every real position
        for t in range(items.size(1)):
            rows = lengths > t
            expected = reference.forward(items[rows], torch.full((int(rows.sum()),), t + 1))
            torch.testing.assert_close(hidden[rows, t], expected, atol=1e-5, rtol=1e-5)

        # full ranking from the last position: RecBole's column 0 is the padding row
        last = gather_states(hidden, lengths - 1)
        expected_scores = reference.full_sort_predict({"item_id_list": items, "item_length": lengths})
        torch.testing.assert_close(decoder.logits(last), expected_scores[:, 1:], atol=1e-5, rtol=1e-5)


def test_init_follows_recbole():
    decoder = make_decoder()
    assert decoder.item_emb.weight[1:].std().item() == pytest.approx(0.02, rel=0.1)
    assert torch.all(decoder.item_emb.weight[0] == 0)
    assert torch.all(decoder.blocks[0].qkv.bias == 0)
    assert torch.all(decoder.blocks[0].ln_attn.weight == 1)


def test_causal():
    decoder = make_decoder()
    items = right_padded([10, 10], L=10)
    changed = items.clone()
    changed[:, 6] = changed[:, 6] % N_ITEMS + 1
    with torch.no_grad():
        before, after = decoder.encode(items), decoder.encode(changed)
    torch.testing.assert_close(before[:, :6], after[:, :6])
    assert not torch.allclose(before[:, 6:], after[:, 6:])


def test_padding_invariant_and_finite():
    decoder = make_decoder()
    lengths = [5, 3, 0]  # an all-padding row must not turn into NaN either
    short = right_padded(lengths, L=5)
    long = torch.cat([short, torch.zeros(3, 11, dtype=torch.long)], dim=1)
    with torch.no_grad():
        hidden_short, hidden_long = decoder.encode(short), decoder.encode(long)
    assert torch.isfinite(hidden_long).all()
    for row, n in enumerate(lengths):
        torch.testing.assert_close(hidden_long[row, :n], hidden_short[row, :n], atol=1e-6, rtol=1e-6)


def test_train_mode_finite_with_padding():
    decoder = make_decoder().train()
    hidden = decoder.encode(right_padded([16, 2, 0], L=16))
    assert torch.isfinite(hidden).all()
    hidden.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in decoder.parameters() if p.grad is not None)


def test_logits_over_range_are_slice_of_full():
    decoder = make_decoder()
    with torch.no_grad():
        hidden = decoder.encode(right_padded([7, 4], L=7))
    full = decoder.logits(hidden)
    assert full.shape == (2, 7, N_ITEMS)
    lo, hi = 11, 20
    torch.testing.assert_close(decoder.logits(hidden, (lo, hi)), full[..., lo - 1 : hi - 1])
    # column j of the full scores is item j + 1
    torch.testing.assert_close(full[0, 0, 4], hidden[0, 0] @ decoder.item_emb.weight[5])


@pytest.mark.parametrize("item_range", [(0, 5), (5, 5), (3, N_ITEMS + 2)])
def test_logits_reject_bad_range(item_range):
    decoder = make_decoder()
    with pytest.raises(ValueError):
        decoder.logits(torch.zeros(2, CONFIG.hidden_size), item_range)


def test_encode_rejects_too_long():
    with pytest.raises(ValueError):
        make_decoder().encode(torch.ones(1, CONFIG.max_len + 1, dtype=torch.long))


def test_target_states():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float).view(2, 4, 3)
    lengths = torch.tensor([4, 2])
    torch.testing.assert_close(target_states(hidden, lengths), torch.stack([hidden[0, 2], hidden[1, 0]]))
    with pytest.raises(RuntimeError):
        target_states(hidden, torch.tensor([4, 1]))  # no history: position -1 must not wrap around


def test_roundtrip_through_plain_dict():
    decoder = make_decoder()
    args = dataclasses.asdict(decoder.config)
    rebuilt = TaesarDecoder.from_dict(args)
    rebuilt.load_state_dict(decoder.state_dict())
    assert rebuilt.config == decoder.config
    items = right_padded([6], L=6)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval().encode(items), decoder.encode(items))


def test_config_rejects_bad_heads():
    with pytest.raises(ValueError):
        DecoderConfig(n_items=5, hidden_size=30, n_heads=4)
