"""The mlx backend for real: mlx[cpu] + mlx-lm on this machine, with a tiny llama model and a LoRA
adapter that the test builds itself (random weights, a word-level tokenizer trained here; nothing
is downloaded). Skips with the import error when mlx cannot run here.
"""
from __future__ import annotations

import json

import pytest

try:
    import mlx.core as mx
    import mlx_lm  # noqa: F401
except Exception as e:  # ImportError, or a missing native library on this platform
    pytest.skip(f"mlx backend cannot run here: {type(e).__name__}: {e} (pip install 'moedb[mlx]')",
                allow_module_level=True)

from moedb.errors import ConfigError
from moedb.generate import GenRequest, make_generator, validate_config
from moedb.generate.mlx import mlx_stats

CORPUS = ["the cat sat on the mat", "a dog ran in the park", "sql joins combine tables",
          "the bird sang a song", "question answer context expert"]


@pytest.fixture(scope="module")
def tiny_mlx(tmp_path_factory):
    """``(model_dir, adapter_dir)``: a 2-layer llama (hidden 32) and a rank-4 LoRA adapter for it."""
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import save_config, save_model
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("mlx")
    model_dir, adapter_dir = root / "tiny", root / "adapter"
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.train_from_iterator(CORPUS, trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(model_dir)
    cfg = dict(model_type="llama", hidden_size=32, num_hidden_layers=2, intermediate_size=64,
               num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=1e-5, vocab_size=tok.get_vocab_size(),
               tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    mx.random.seed(0)
    m = llama.Model(llama.ModelArgs.from_dict(cfg))
    mx.eval(m.parameters())
    save_model(model_dir, m)
    save_config(dict(cfg), model_dir / "config.json")
    lp = {"rank": 4, "scale": 20.0, "dropout": 0.0, "keys": ["self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj"]}
    linear_to_lora_layers(m, 2, lp)
    mx.random.seed(1)
    ad = {k: (mx.random.normal(v.shape) * 0.5 if k.endswith("lora_b") else v)
          for k, v in tree_flatten(m.parameters()) if k.endswith(("lora_a", "lora_b"))}
    adapter_dir.mkdir()
    mx.save_safetensors(str(adapter_dir / "adapters.safetensors"), ad)
    (adapter_dir / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": lp}))
    return str(model_dir), str(adapter_dir)


def test_mlx_config_validation(tiny_mlx, tmp_path):
    model, adapter = tiny_mlx
    assert validate_config({"backend": "mlx", "model": model, "adapter_path": adapter})["adapter_path"] == adapter
    with pytest.raises(ConfigError, match=r"generator\.adapter_path: .* has no readable adapter_config\.json"):
        validate_config({"backend": "mlx", "model": model, "adapter_path": str(tmp_path)})


def test_mlx_generation_is_deterministic_and_the_adapter_changes_it(tiny_mlx):
    model, adapter = tiny_mlx
    base = make_generator(validate_config({"backend": "mlx", "model": model, "max_tokens": 8, "mode": "completion"}))
    lora = make_generator(validate_config({"backend": "mlx", "model": model, "adapter_path": adapter,
                                           "max_tokens": 8, "mode": "completion"}))
    req = GenRequest(query="a dog ran in the park")
    g1, g2, g3 = base.generate(req), base.generate(req), lora.generate(req)
    assert g1.text and g1.text == g2.text
    assert g3.text and g3.text != g1.text
    assert g1.completion_tokens >= 1 and g1.prompt_tokens > 5
    streamed = []
    g4 = lora.generate(req, on_token=streamed.append)
    assert g4.text == g3.text and "".join(streamed).strip() == g3.text


def test_mlx_experts_answer_through_ask(db, tiny_mlx):
    model, adapter = tiny_mlx
    db.add_expert("pets", ["the cat sat on the mat", "a dog ran in the park"],
                  generator={"backend": "mlx", "model": model, "max_tokens": 6})
    db.add_expert("sql", ["sql joins combine tables"],
                  generator={"backend": "mlx", "model": model, "adapter_path": adapter, "max_tokens": 6})
    loads = mlx_stats()["model_loads"]
    a = db.ask("where did the dog run", top_k=2, strategy="concatenate",
               min_confidence=0.0)  # (both experts are asked: this test is about the mlx backend)
    assert [c.ok for c in a.contributions] == [True, True], [c.error for c in a.contributions]
    assert all(c.backend == "mlx" and c.tokens >= 1 for c in a.contributions)
    assert mlx_stats()["model_loads"] - loads <= 2  # the two (model, adapter) pairs, loaded once each
    db.ask("where did the dog run", top_k=2, strategy="concatenate", min_confidence=0.0)
    assert mlx_stats()["model_loads"] - loads <= 2
