"""Generator configuration is refused when it is set, with a message naming the field."""
from __future__ import annotations

import dataclasses
import os
import struct

import pytest

import moedb
from moedb.errors import ConfigError, InvalidInput
from moedb.generate import BACKENDS, effective_config, make_generator, validate_config


def _write_gguf_kv(path, general_type="model"):
    """A tiny valid GGUF file (no tensors) with general.type set, written with the gguf package."""
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_string("general.type", general_type)
    if general_type == "adapter":
        w.add_string("adapter.type", "lora")
        w.add_float32("adapter.lora.alpha", 1.0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def test_unknown_backend_is_named():
    with pytest.raises(ConfigError, match=r"generator\.backend: unknown backend 'gpt'"):
        validate_config({"backend": "gpt"})


def test_unknown_field_is_named():
    with pytest.raises(ConfigError, match=r"generator\.temprature: unknown field"):
        validate_config({"backend": "extractive", "temprature": 0.2})


@pytest.mark.parametrize("cfg, field", [
    ({"backend": "llama"}, "model"),
    ({"backend": "openai"}, "base_url"),
    ({"backend": "openai", "base_url": "ftp://x"}, "base_url"),
    ({"backend": "extractive", "max_tokens": 0}, "max_tokens"),
    ({"backend": "extractive", "timeout": -1}, "timeout"),
    ({"backend": "extractive", "retries": 1.5}, "retries"),
    ({"backend": "extractive", "top_p": 2}, "top_p"),
    ({"backend": "openai", "base_url": "http://h/v1", "api_key_env": "not a name"}, "api_key_env"),
    ({"backend": "mlx", "model": "/no/such/dir"}, "model"),
    ({"backend": "mlx", "model": "org/some-model"}, "model"),
])
def test_bad_fields_are_named(cfg, field):
    with pytest.raises(ConfigError, match=rf"generator\.{field}:"):
        validate_config(cfg)


def test_api_key_is_never_stored():
    with pytest.raises(ConfigError, match=r"generator\.api_key:.*api_key_env"):
        validate_config({"backend": "openai", "base_url": "http://127.0.0.1:1/v1", "api_key": "sk-123"})


def test_missing_model_file(tmp_path):
    with pytest.raises(ConfigError, match=r"generator\.model: no such file"):
        validate_config({"backend": "llama", "model": str(tmp_path / "base.gguf")})


def test_not_a_gguf(tmp_path):
    p = tmp_path / "base.gguf"
    p.write_bytes(b"PK\x03\x04 not gguf")
    with pytest.raises(ConfigError, match=r"generator\.model: .* is not a GGUF file"):
        validate_config({"backend": "llama", "model": str(p)})


def test_unreadable_adapter(tmp_path):
    model = _write_gguf_kv(tmp_path / "base.gguf")
    lora = tmp_path / "sql.gguf"
    lora.write_bytes(b"GGUF")
    os.chmod(lora, 0)
    try:
        if os.access(lora, os.R_OK):  # running as root: permissions do not stop reading; use a corrupt file
            lora.write_bytes(b"GGUF" + struct.pack("<I", 3) + b"\xff" * 5)
        with pytest.raises(ConfigError, match=r"generator\.lora: "):
            validate_config({"backend": "llama", "model": model, "lora": str(lora)})
    finally:
        os.chmod(lora, 0o644)


def test_adapter_must_be_an_adapter(tmp_path):
    model = _write_gguf_kv(tmp_path / "base.gguf")
    with pytest.raises(ConfigError, match=r"generator\.lora: .* is not a LoRA adapter"):
        validate_config({"backend": "llama", "model": model, "lora": model})
    lora = _write_gguf_kv(tmp_path / "a.gguf", "adapter")
    with pytest.raises(ConfigError, match=r"generator\.model: .* is a LoRA adapter"):
        validate_config({"backend": "llama", "model": lora})
    cfg = validate_config({"backend": "llama", "model": model, "lora": lora, "max_tokens": 8})
    assert cfg["lora"] == lora and os.path.isabs(cfg["model"])


def test_relative_paths_resolve_against_base_dir(tmp_path):
    _write_gguf_kv(tmp_path / "base.gguf")
    cfg = validate_config({"backend": "llama", "model": "base.gguf"}, base_dir=str(tmp_path))
    assert cfg["model"] == str(tmp_path / "base.gguf")


def test_overlay_and_effective_config():
    ov = validate_config({"system_prompt": "Be brief.", "max_tokens": 5})
    assert effective_config(ov, None) == {"backend": "extractive", "system_prompt": "Be brief.", "max_tokens": 5}
    base = {"backend": "openai", "base_url": "http://h:1/v1"}
    assert effective_config(ov, base)["base_url"] == "http://h:1/v1"
    assert effective_config({"backend": "extractive"}, base) == {"backend": "extractive"}
    with pytest.raises(ConfigError, match=r"generator\.model: unknown field for a generator without backend"):
        validate_config({"model": "x.gguf"})


def test_registry_builds_typed_configs_with_defaults():
    from moedb.generate.config import REGISTRY
    from moedb.generate.schema import BaseConfig

    assert BACKENDS == tuple(REGISTRY) == ("extractive", "llama", "llama_server", "mlx", "openai")
    for name, (gen_cls, cfg_cls) in REGISTRY.items():
        assert gen_cls.backend == name and issubclass(cfg_cls, BaseConfig) and dataclasses.is_dataclass(cfg_cls)
    stored = validate_config({"backend": "openai", "base_url": "http://h:1/v1/", "stop": "END", "max_tokens": 7})
    assert stored == {"backend": "openai", "base_url": "http://h:1/v1", "stop": ["END"], "max_tokens": 7}  # sparse
    cfg = make_generator(stored).config
    assert (cfg.base_url, cfg.stop, cfg.max_tokens, cfg.model, cfg.timeout, cfg.mode) == \
        ("http://h:1/v1", ["END"], 7, "default", 60.0, "auto")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.max_tokens = 1
    ov = make_generator(effective_config({"max_tokens": 3}, {"backend": "extractive", "max_passages": 1})).config
    assert (ov.max_tokens, ov.max_passages, ov.max_chars) == (3, 1, 600)


def test_database_refuses_bad_generators_at_set_time(db_path, embedder, tmp_path):
    db = moedb.connect(db_path, embedder=embedder)
    try:
        db.add_expert("a", ["alpha text about apples"])
        before = db.expert("a")
        with pytest.raises(ConfigError, match=r"generator\.model"):
            db.set_generator("a", {"backend": "llama", "model": str(tmp_path / "missing.gguf")})
        with pytest.raises(ConfigError, match=r"generator\.backend"):
            db.add_expert("b", ["beta"], generator={"backend": "nope"})
        with pytest.raises(ConfigError, match=r"generator\.backend"):
            db.set_default_generator({"backend": "nope"})
        with pytest.raises(ConfigError, match=r"generator\.base_url"):
            db.set_fallback_generator({"backend": "openai"})
        with pytest.raises(ConfigError, match="strategy: unknown strategy 'majority'"):
            db.set_ask_defaults(strategy="majority")
        with pytest.raises(ConfigError, match="options.n"):
            db.set_ask_defaults(strategy="best_of_n", options={"n": 0})
        assert [e.name for e in db.experts()] == ["a"]
        assert db.expert("a").generator == before.generator is None
        assert db.store.get_meta("generator") is None and db.ask_defaults()["strategy"] == "weighted"
        cfg = db.set_generator("a", {"backend": "extractive", "max_passages": 1})
        assert db.expert("a").generator == cfg == {"backend": "extractive", "max_passages": 1}
    finally:
        db.close()
    with pytest.raises(ConfigError, match=r"generator\.backend"):
        moedb.connect(db_path, embedder=embedder, generator={"backend": "nope"}).close()


def test_ask_refuses_unknown_strategy_and_bad_rounds(db):
    db.add_expert("a", ["alpha text about apples"])
    with pytest.raises(ConfigError, match="unknown strategy 'best'"):
        db.ask("apples?", strategy="best")
    with pytest.raises(ConfigError, match="collaboration"):
        db.ask("apples?", collaboration="together")
    with pytest.raises(InvalidInput, match="rounds=2 only applies to the debate"):
        db.ask("apples?", strategy="weighted", rounds=2)
    with pytest.raises(ConfigError, match="options.min_score: not an option of the voting"):
        db.ask("apples?", strategy="voting", options={"min_score": 1})
    assert db.store.log.count() == 0
