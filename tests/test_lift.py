"""Lifting a reduced-vocabulary toy model to real embedding rows keeps its distribution exactly
(opd_exp/toyworld/lift.py), brute force over every real row."""

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM

from opd_exp.toyworld.lift import lift, other_offset


@pytest.mark.parametrize("tied", [True, False])
def test_the_real_size_softmax_is_the_small_models(tmp_path, tied):
    torch.manual_seed(0)
    vocab, other, rows = 12, 7, 1000
    config = Qwen3Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                         tie_word_embeddings=tied, max_position_embeddings=64,
                         eos_token_id=[2, 4], pad_token_id=9, bos_token_id=None)
    small = Qwen3ForCausalLM(config).double().eval()
    with torch.no_grad():  # a wide range of logits, as a trained model has
        small.get_output_embeddings().weight.mul_(40)
    real_ids = [5, 900, 17, 3, 999, 250, 42, 0, 11, 640, 12, 13]  # real_ids[other] is ignored
    small.generation_config.eos_token_id = 4
    big = lift(small, real_ids, other, rows)
    assert big.get_input_embeddings().weight.shape == (rows, 32)
    # the end and padding tokens are the real vocabulary's ids of the same tokens
    assert big.config.eos_token_id == [17, 999] and big.config.pad_token_id == 640
    assert big.generation_config.eos_token_id == 999 and big.config.bos_token_id is None
    big.save_pretrained(tmp_path)
    big = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()

    small_ids = torch.tensor([[1, 3, 0, 9, 2, 11, 4]])  # the task's tokens, never `other`
    real = torch.tensor([[real_ids[i] for i in small_ids[0]]])
    with torch.no_grad():
        logits = small(small_ids).logits[0]
        logits[:, other] += other_offset(rows, vocab - 1)
        p_small = logits.softmax(-1)
        p_real = big(real).logits[0].softmax(-1)
    task = [i for i in range(vocab) if i != other]
    task_real = [real_ids[i] for i in task]
    rest = torch.ones(rows, dtype=torch.bool)
    rest[task_real] = False
    assert torch.allclose(p_real[:, task_real], p_small[:, task], atol=1e-12, rtol=1e-9)
    assert torch.allclose(p_real[:, rest].sum(-1), p_small[:, other], atol=1e-12, rtol=1e-9)
    assert rest.sum() == rows - len(task)


def test_bad_maps_are_refused():
    small = Qwen3ForCausalLM(Qwen3Config(vocab_size=4, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=1,
                                         num_key_value_heads=1, head_dim=16))
    with pytest.raises(ValueError, match="distinct"):
        lift(small, [1, 1, 2, 0], other=3, rows=10)
    with pytest.raises(ValueError, match="distinct and in 0..9"):
        lift(small, [1, 2, 10, 0], other=3, rows=10)
    with pytest.raises(ValueError, match="map all 4"):
        lift(small, [1, 2], other=1, rows=10)
    small.config.eos_token_id = 3  # the `other` class is not a token
    with pytest.raises(ValueError, match="eos_token_id=3"):
        lift(small, [1, 2, 5, 0], other=3, rows=10)
    with pytest.raises(ValueError, match="must exceed"):
        other_offset(3, 3)
