"""The corrector's "fields" conditioning: parsed prompt fields as tokens, and where they are used."""
from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from xlard.models import CorrectorConfig, ResidualCorrector, corrector_inputs
from xlard.prompts import PromptSpec, from_geneval, parse
from xlard.prompts.fields import field_keys, field_tokens, field_vector


def test_tokens_compose_from_fixed_field_vectors():
    tokens, mask = field_tokens([parse("a photo of five triangles"), parse("a photo of five circles"),
                                 parse("a photo of two triangles")], 16)
    assert tokens.shape == (3, 2, 16) and tokens.dtype == torch.float32 and mask.all()
    # a token is its value's vector plus its slot's: the same noun or count is the same direction anywhere
    assert torch.equal(tokens[0, 0], field_vector("noun", "triangle", 16) + field_vector("slot", "0:noun", 16))
    assert torch.equal(tokens[0, 1], tokens[1, 1])      # five, five
    assert torch.equal(tokens[0, 0], tokens[2, 0])      # triangle, triangle
    assert not torch.equal(tokens[0, 1], tokens[2, 1])  # five, two
    assert torch.equal(field_vector("count", 5, 16), field_vector("count", 5, 16))


def test_tokens_are_the_same_in_another_process():
    code = ("import torch; from xlard.prompts import parse; from xlard.prompts.fields import field_tokens; "
            "print(field_tokens([parse('a photo of a red circle left of a blue square')], 8)[0].flatten().tolist())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    here = field_tokens([parse("a photo of a red circle left of a blue square")], 8)[0].flatten()
    assert torch.equal(torch.tensor(json.loads(out)), here)


def test_rows_are_padded_and_masked_and_relations_name_their_roles():
    specs = [parse("a photo of a red circle left of a blue square"), parse("a photo of a dog")]
    tokens, mask = field_tokens(specs, 8, dtype=torch.float64)
    # red circle: noun, count, color; blue square: noun, count, color; the relation
    assert tokens.shape == (2, 7, 8) and tokens.dtype == torch.float64
    assert mask[0].all() and mask[1].tolist() == [True, True] + [False] * 5
    assert torch.equal(tokens[1, 2:], torch.zeros(5, 8, dtype=torch.float64))
    keys = field_keys(specs[0])
    assert keys[-1] == (("relation", "left_of"), ("slot", "relation:0->1"))
    swapped = field_keys(parse("a photo of a blue square right of a red circle"))
    assert swapped[-1] == (("relation", "right_of"), ("slot", "relation:0->1"))
    empty = PromptSpec(prompt="nothing", entities=())  # a spec without entities: one token to attend to
    assert field_keys(empty) == [(("empty", ""), ("slot", "empty"))]


def test_parsed_and_geneval_specs_give_the_same_tokens():
    """The trainer's specs come from GenEval metadata (entities in the record's order), the
    distillation fit's from parsing the prompt: both number the entities in prompt order."""
    pytest.importorskip("diffusers")
    from xlard.train.data import load_records

    records, _ = load_records("shapes:train")
    record = next(r for r in records if r["prompt"] == "a photo of a diamond below a circle")
    assert from_geneval(record).entities[0].noun == "circle"  # the metadata lists the circle first
    assert all(field_keys(parse(r["prompt"])) == field_keys(from_geneval(r)) for r in records)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="dim must be an integer in \\[1, 65536\\], got 0"):
        field_tokens([parse("a photo of a cat")], 0)
    with pytest.raises(ValueError, match="specs is empty"):
        field_tokens([], 8)
    with pytest.raises(ValueError, match="must be PromptSpec objects.*got str"):
        field_tokens(["a photo of a cat"], 8)
    with pytest.raises(ValueError, match="conditioning must be one of"):
        CorrectorConfig.tiny(conditioning="clip")


def test_bad_arguments_are_named():
    """Were "'NoneType' object is not iterable", "'PromptSpec' object is not iterable", torch's to() errors, an int
    dtype casting the tokens to integers, field_keys blaming field_tokens, a kind of None taken as a key and a lone
    surrogate a UnicodeEncodeError."""
    spec = parse("a photo of a cat")
    for bad, named in ((None, "NoneType"), (3, "int"), ("a photo of a cat", "str"),
                       (spec, r"PromptSpec \(one spec\? pass \[spec\]\)")):
        with pytest.raises(TypeError, match=rf"field_tokens: specs must be a list of PromptSpec objects .*got {named}"):
            field_tokens(bad, 8)
    with pytest.raises(ValueError, match=r"field_tokens: specs must be PromptSpec objects .*got int at specs\[1\]"):
        field_tokens([spec, 3], 8)
    for dtype, shown in ((torch.long, "torch.int64"), ("float32", "'float32'")):
        with pytest.raises(TypeError, match=f"field_tokens: dtype must be a floating torch dtype, got {shown}"):
            field_tokens([spec], 8, dtype=dtype)
    with pytest.raises(ValueError, match="field_tokens: device must be a torch device or its name, got 'nope'"):
        field_tokens([spec], 8, device="nope")
    assert torch.equal(field_tokens((spec,), 8, device="cpu", dtype=None)[0], field_tokens([spec], 8)[0])
    with pytest.raises(ValueError, match="field_keys: spec must be a PromptSpec .*got NoneType"):
        field_keys(None)
    with pytest.raises(TypeError, match=r"field_vector: kind must be a field kind string .*got None"):
        field_vector(None, 3, 8)
    with pytest.raises(ValueError, match="field_vector: kind must be a non-empty field kind string"):
        field_vector("", 3, 8)
    odd = field_vector("noun", "cat\udcff", 8)  # a lone surrogate (a file read with errors="surrogateescape")
    assert odd.shape == (8,) and torch.equal(odd, field_vector("noun", "cat\udcff", 8))
    assert not torch.equal(odd, field_vector("noun", "cat", 8))


def _embedding(batch, length=5, dim=8, pooled=6):
    return SimpleNamespace(tokens=torch.randn(batch, length, dim), pooled=torch.randn(batch, pooled),
                           mask=torch.ones(batch, length, dtype=torch.bool),
                           as_corrector_inputs=lambda: {"marker": "text"})


def test_corrector_inputs_follow_the_conditioning(tmp_path):
    specs = [parse("a photo of three circles"), parse("a photo of a red square")]
    emb = _embedding(2)
    text = ResidualCorrector(CorrectorConfig.tiny(latent_channels=4, text_dim=8, pooled_dim=6))
    assert corrector_inputs(text, emb, specs) == {"marker": "text"}
    assert corrector_inputs(None, emb, specs) == {"marker": "text"}
    fields = ResidualCorrector(CorrectorConfig.tiny(latent_channels=4, text_dim=8, pooled_dim=6,
                                                    conditioning="fields"))
    got = corrector_inputs(fields, emb, specs)
    want_tokens, want_mask = field_tokens(specs, 8)
    assert torch.equal(got["text_tokens"], want_tokens) and torch.equal(got["text_mask"], want_mask)
    assert torch.equal(got["pooled"], torch.zeros(2, 6))
    with pytest.raises(ValueError, match="1 prompt specs for a batch of 2"):
        corrector_inputs(fields, emb, specs[:1])
    # What is not an embedding or not parsed prompts is named (were an AttributeError and a TypeError from inside).
    with pytest.raises(TypeError, match=r"prompt_embedding must be a backbone's PromptEmbedding .*got NoneType"):
        corrector_inputs(text, None, specs)
    for bad, named in [(["a photo of three circles"] * 2, r"a list of \['str'\]"), (None, "NoneType"),
                       (specs[0], "PromptSpec")]:
        with pytest.raises(TypeError, match=rf"specs must be a list of PromptSpec .*got {named}"):
            corrector_inputs(fields, emb, bad)
    # the conditioning survives a save and load; a folder written before the field existed reads as "text"
    fields.save_pretrained(tmp_path / "f")
    assert ResidualCorrector.from_pretrained(tmp_path / "f").config.conditioning == "fields"
    text.save_pretrained(tmp_path / "t")
    cfg_path = tmp_path / "t" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["config"]["conditioning"]
    cfg_path.write_text(json.dumps(cfg))
    assert ResidualCorrector.from_pretrained(tmp_path / "t").config.conditioning == "text"
    # the corrector runs on them, and its output depends on the fields only
    z0 = torch.randn(2, 4, 8, 8)
    torch.nn.init.normal_(fields.head.weight)
    out = fields(z0, **got)
    other = corrector_inputs(fields, _embedding(2), specs)
    assert torch.equal(fields(z0, **other), out)


def test_cached_token_rows_are_keyed_by_the_vectors_keys_and_never_change():
    """Token rows are cached per prompt: a caller writing into the returned tokens changes nothing later, and
    equal values of other types (a count of 1.0 or True forced past Entity's check) are not the cached row of 1."""
    first, _ = field_tokens([parse("a photo of a circle")], 8)
    kept = first.clone()
    first.add_(1.0)
    assert torch.equal(field_tokens([parse("a photo of a circle")], 8)[0], kept)
    spec = parse("a photo of a circle")
    for other in (1.0, True):
        odd = parse("a photo of a circle")
        object.__setattr__(odd.entities[0], "count", other)  # past the check, as a duck-typed spec could be
        tokens = field_tokens([odd], 8)[0]
        assert torch.equal(tokens[0, 1], field_vector("count", other, 8) + field_vector("slot", "0:count", 8))
        assert not torch.equal(tokens, field_tokens([spec], 8)[0])
