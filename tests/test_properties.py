"""Property-based tests (hypothesis): arbitrary user input gives a clean error or a valid result.

The error contract: only ValueError, TypeError or FileNotFoundError may come out, each with a message; never
IndexError, KeyError, RuntimeError, AttributeError, RecursionError or a hang. Valid inputs must give results
that hold the documented invariants. Each bug the properties found is pinned by an `@example`.
"""

import json
import math
import shutil
import string
from contextlib import contextmanager
from dataclasses import fields

import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import vadusa
from tests.conftest import budget
from vadusa.speech.text import ALLOWED, MAX_CHARS, PUNCTUATION, check_text, normalise

USER_ERRORS = (ValueError, TypeError, FileNotFoundError)


@contextmanager
def user_error_or_nothing():
    """Let a user error with a message pass; anything else (IndexError, KeyError, RecursionError...) fails."""
    try:
        yield
    except USER_ERRORS as e:
        event(f"{type(e).__name__}: {str(e)[:40]}")
        assert str(e).strip(), f"{type(e).__name__} without a message"
    else:
        event("accepted")


# ----- trees -----
scalars = (
    st.integers(-3, 12)
    | st.integers()
    | st.booleans()
    | st.floats(allow_nan=True)
    | st.text(max_size=3)
    | st.none()
    | st.just(2**70)
)
nested = st.recursive(scalars, lambda kids: st.lists(kids, max_size=5) | st.dictionaries(st.text(max_size=3), kids),
                      max_leaves=40)  # fmt: skip


def valid_paths(max_nodes: int = 24, max_rank: int = 5, max_depth: int = 5):
    """Strategy: a valid tree's paths (every prefix present), in a shuffled order."""

    @st.composite
    def build(draw):
        paths: set[tuple[int, ...]] = set()
        for _ in range(draw(st.integers(1, max_nodes))):
            parent = draw(st.sampled_from(sorted([()] + [p for p in paths if len(p) < max_depth])))
            paths.add(parent + (draw(st.integers(0, max_rank)),))
        return draw(st.permutations([list(p) for p in sorted(paths)]))

    return build()


def check_buffers(tree: vadusa.Tree) -> None:
    """The buffers agree with the paths: parents are ancestors one level up, children and leaves match."""
    n = len(tree)
    parents, depths, mask = tree.parents.tolist(), tree.depths.tolist(), tree.ancestor_mask
    assert parents[0] == -1 and depths[0] == 0
    for i, p in enumerate(tree.paths, start=1):
        assert 0 <= parents[i] < i and mask[i, parents[i]] and depths[parents[i]] == depths[i] - 1
        assert depths[i] == len(p) and (tree.paths[parents[i] - 1] if parents[i] else ()) == p[:-1]
        assert int(mask[i].sum()) == len(p) + 1  # itself and its ancestors, root included
        assert tree.heads_and_ranks[i - 1].tolist() == [len(p) - 1, p[-1]]
    assert sorted(int(c) for kids in tree.children for c in kids) == list(range(1, n))
    assert sum(len(k) == 0 for k in tree.children) == len(tree.leaf_paths)
    for path in tree.leaf_paths:
        assert path[0] == 0 and all(parents[b] == a for a, b in zip(path, path[1:], strict=False))


@settings(max_examples=budget(200), deadline=None)
@given(paths=nested | st.lists(nested, max_size=6), meta=st.none() | nested)
@example(paths=[[True], [True, 0]], meta=None)  # bools are not ranks
@example(paths=[[2**70]], meta=None)  # a rank beyond int64 broke the buffers
@example(paths=[[0], 5], meta=None)  # a path that is not a list
@example(paths=[[0]], meta="abc")  # meta that is not a dict
@example(paths=None, meta=None)
def test_tree_from_paths_any_input(paths, meta):
    try:
        tree = vadusa.Tree.from_paths(paths, meta)
    except USER_ERRORS as e:
        assert "path" in str(e) or "tree" in str(e), f"the error does not say what was expected: {e}"
        return
    assert all(type(r) is int and r >= 0 for p in tree.paths for r in p)
    check_buffers(tree)


@settings(max_examples=budget(100), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(paths=valid_paths(), meta=st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5)))
def test_tree_json_round_trip(tmp_path, paths, meta):
    tree = vadusa.Tree.from_paths(paths, meta)
    check_buffers(tree)
    tree.to_json(tmp_path / "t.json")
    back = vadusa.Tree.from_json(tmp_path / "t.json")
    assert back.paths == tree.paths and back.meta == tree.meta
    assert torch.equal(back.parents, tree.parents) and torch.equal(back.ancestor_mask, tree.ancestor_mask)
    assert sorted(tree.paths) == sorted(tuple(p) for p in paths)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=4),
    lambda kids: st.lists(kids, max_size=5) | st.dictionaries(st.text(max_size=4), kids, max_size=4),
    max_leaves=30,
)
json_docs = (
    json_values.map(json.dumps)
    | st.builds(lambda p, m: json.dumps({"paths": p, "meta": m}), nested, json_values)
    | st.text(max_size=40)
    | st.integers(1, 50_000).map(lambda d: "[" * d + "]" * d)  # deep nesting: json's RecursionError
)


@settings(max_examples=budget(200), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=json_docs | st.binary(max_size=40))
@example(doc="[" * 100_000 + "]" * 100_000)  # RecursionError out of json.loads
@example(doc=b"\xff\xfe[[0]]")  # not UTF-8: the error named no file
@example(doc='{"paths": [[0]], "meta": 3}')
@example(doc='{"paths": [[1e400]]}')
def test_tree_from_json_any_file(tmp_path, doc):
    path = tmp_path / "tree.json"
    path.write_bytes(doc if isinstance(doc, bytes) else doc.encode())
    try:
        tree = vadusa.Tree.from_json(path)
    except USER_ERRORS as e:
        assert str(path) in str(e), f"the error does not name the file: {e}"
        return
    check_buffers(tree)


def test_tree_from_json_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        vadusa.Tree.from_json(tmp_path / "nope.json")


# ----- text -----
unicode_text = (
    st.text(max_size=60)
    | st.text(st.characters(codec="utf-8"), max_size=300)
    | st.text(st.sampled_from(" \t\n\r\u00a0\u2028\u200b\u200f\u202e"), max_size=10)  # whitespace, bidi controls
    | st.text(st.sampled_from(string.ascii_letters + " ,.?!;:'-\"()\u2014\u2026\u201c\u2019"), max_size=250)
    | st.text(st.characters(min_codepoint=0x1F300, max_codepoint=0x1FAFF) | st.sampled_from("\u05d0\u0628a "))
)


@settings(max_examples=budget(500), deadline=None)
@given(text=unicode_text)
@example(text="a" * 10_000)
@example(text="")
@example(text=" \t ")
def test_normalise_invariants(text):
    clean = normalise(text)
    assert isinstance(clean, str)
    assert clean == normalise(clean), "normalise is not idempotent"
    assert clean == clean.strip(" ,;:") and "  " not in clean
    assert not any(a in PUNCTUATION and b in PUNCTUATION for a, b in zip(clean, clean[1:], strict=False))


@settings(max_examples=budget(500), deadline=None)
@given(text=unicode_text | st.none() | st.integers() | st.binary(max_size=5))
@example(text="hello \U0001f600 world")
def test_check_text_any_input(text):
    with user_error_or_nothing():
        clean = check_text(text)
        assert set(clean) <= ALLOWED and any(c.isalpha() for c in clean) and len(clean) <= MAX_CHARS
        assert clean == normalise(text) == check_text(clean)


def test_check_text_errors_name_the_problem():
    with pytest.raises(ValueError, match="no letters"):
        check_text(" ... ")
    with pytest.raises(ValueError, match="unsupported"):
        check_text("I have 3 cats")
    with pytest.raises(ValueError, match="at most"):
        check_text("word " * 100)
    assert check_text("\u201cHello\u201d \u2014 world\u2026") == "Hello, world."


# ----- artifact configs: config.json of draft heads, block_config.json of a block adapter -----
HEADS_CONFIG = {"num_heads": 2, "num_layers": 1, "hidden_size": 8, "vocab_size": 12}


def config_dicts(valid: dict, extra_keys: list[str]):
    """Strategy: `valid` with one field dropped, changed to any JSON value or one key added; or any JSON object."""
    keys = sorted(valid) + extra_keys
    return st.one_of(
        st.sampled_from(sorted(valid)).map(lambda k: {n: v for n, v in valid.items() if n != k}),
        st.builds(lambda k, v: valid | {k: v}, st.sampled_from(keys) | st.text(max_size=6), json_values),
        st.dictionaries(st.sampled_from(keys) | st.text(max_size=6), json_values, max_size=8),
        st.just(valid),
    )


@pytest.fixture(scope="module")
def heads_dir(tmp_path_factory):
    from vadusa.heads import HeadsConfig

    d = tmp_path_factory.mktemp("heads")
    heads = vadusa.DraftHeads(HeadsConfig(**HEADS_CONFIG))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_()
    heads.save_pretrained(d)
    return d


@settings(max_examples=budget(200), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(config=config_dicts(HEADS_CONFIG | {"root_token": False}, ["shared_output", "base_model", "kind",
                                                                    "medusa_num_heads", "model_type"]))  # fmt: skip
@example(config=HEADS_CONFIG | {"num_heads": 2**40, "vocab_size": 2**40})  # allocated 2^84 floats before the check
@example(config=HEADS_CONFIG | {"hidden_size": 0})
@example(config=HEADS_CONFIG | {"num_layers": True})  # a bool is not a size
@example(config=HEADS_CONFIG | {"vocab_size": "12"})
@example(config=HEADS_CONFIG | {"colour": "red"})
@example(config={"num_heads": 2})
def test_heads_config_any_json(heads_dir, config):
    d = heads_dir
    (d / "config.json").write_text(json.dumps(config))
    try:
        heads = vadusa.DraftHeads.from_pretrained(d)
    except USER_ERRORS as e:
        assert str(d) in str(e), f"the error does not name the file: {e}"
        return
    assert {k: getattr(heads.config, k) for k in HEADS_CONFIG} == HEADS_CONFIG
    state = load_file(d / "model.safetensors")
    assert all(torch.equal(v, state[k]) for k, v in heads.state_dict().items())


@pytest.fixture(scope="module")
def drafter_dir(tmp_path_factory):
    from tests.conftest import tiny_llama
    from vadusa.drafter import FeatureDrafter

    d = tmp_path_factory.mktemp("drafter")
    FeatureDrafter.from_model(tiny_llama(), depth=2).save_pretrained(d)
    return d, json.loads((d / "config.json").read_text())


@settings(max_examples=budget(150), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_drafter_config_any_json(drafter_dir, data):
    """The feature drafter's config.json through `load_drafter`, the loader the decoders use."""
    from vadusa.drafter import DrafterConfig, load_drafter

    d, valid = drafter_dir
    config = data.draw(config_dicts(valid, ["num_heads"]), label="config")
    (d / "config.json").write_text(json.dumps(config))
    try:
        drafter = load_drafter(d)
    except USER_ERRORS as e:
        assert str(d) in str(e), f"the error does not name the file: {e}"
        return
    expected = {f.name: f.default for f in fields(DrafterConfig)} | config  # absent fields take their defaults
    assert {k: getattr(drafter.config, k) for k in ("hidden_size", "vocab_size", "depth")} == {
        k: expected[k] for k in ("hidden_size", "vocab_size", "depth")
    }


@pytest.fixture(scope="module")
def block_adapter(tmp_path_factory):
    from tests.conftest import tiny_llama
    from vadusa.blockdiff.student import BlockConfig, make_student, save_adapter

    model = tiny_llama()
    config = BlockConfig.for_model(model, mask_token_id=0, block_size=4)
    d = tmp_path_factory.mktemp("block") / "adapter"
    save_adapter(make_student(tiny_llama(), rank=2), config, d)
    return model, d, json.loads((d / "block_config.json").read_text())


@settings(max_examples=budget(150), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutation=st.data())
def test_block_config_any_json(block_adapter, mutation):
    from vadusa.blockdiff.student import load_student

    model, d, valid = block_adapter
    config = mutation.draw(config_dicts(valid, ["causal_clean", "teacher_prefix"]), label="config")
    (d / "block_config.json").write_text(json.dumps(config))
    try:
        student, loaded = load_student(model, d)
    except USER_ERRORS as e:
        assert str(d) in str(e), f"the error does not name the file: {e}"
        return
    assert loaded.mask_token_id == config["mask_token_id"] and loaded.block_size == config["block_size"] >= 1
    assert student.config.mask_token_id == config["mask_token_id"]


# ----- decoder options: build_decoder(name, model, assets, **options), then run(ids, **sampling) -----
PROMPT = torch.tensor([[3, 17, 5, 40]])
numbers = (
    st.integers(-3, 6)
    | st.sampled_from([0, 1, 2**31, 2**63, 10**30])
    | st.floats(-2, 2)
    | st.sampled_from([math.nan, math.inf, -math.inf, 1e-300, 0.999999])
)
any_value = numbers | st.booleans() | st.none() | st.text(max_size=6) | st.lists(st.integers(-2, 60), max_size=3)
GOOD_BUILD = {  # valid values of every build option of each decoder
    "ar": {},
    "vadusa": {
        "tree": st.sampled_from(["auto", "chain", None]) | st.builds(vadusa.Tree.chain, st.integers(1, 3)),
        "acceptance": st.sampled_from(["greedy", "tolerance", "typical", "lossless"]),
        "tolerance": st.integers(1, 4),
        "typical_epsilon": st.floats(0.01, 0.5),
        "typical_alpha": st.floats(0.05, 0.9),
    },
    "block": {
        "threshold": st.floats(0.05, 1.0),
        "block_size": st.integers(1, 4),
        "unmask": st.sampled_from(["prefix", "any"]),
        "approximate_cache": st.booleans(),
        "sliding": st.booleans() | st.none(),
    },
}
GOOD_RUN = {  # valid sampling options of run(...)
    "max_new_tokens": st.integers(1, 6),
    "temperature": st.just(0) | st.floats(0.1, 2.0),
    "top_k": st.none() | st.integers(1, 100),
    "top_p": st.floats(0.05, 1.0),
    "min_p": st.floats(0.0, 0.5),
    "eos_token_id": st.none() | st.integers(0, 47) | st.lists(st.integers(0, 47), max_size=3),
}
BAD_VALUES = {  # values outside the contract, beside any value at all
    "tree": st.sampled_from(["missing.json", 3, "", []]) | st.builds(vadusa.Tree.chain, st.integers(4, 6)),
    "acceptance": st.sampled_from(["fast", "", "Greedy"]),
    "max_new_tokens": st.sampled_from([10**9, 2**63, 10**30]),
    "temperature": st.sampled_from([math.nan, -1.0, math.inf, -1e-9, 10**400]),
    "top_k": st.sampled_from([0, -1, 2**63, 2.5]),
    "eos_token_id": st.sampled_from([-1, 48, 2**63, "a", [1, "a"], 1.5]),
}


@st.composite
def options_with_one_bad(draw, good: dict):
    """(options, bad option name or None): valid values for some of `good`'s options, and maybe one option
    (or an unknown name) set to a bad value."""
    options = draw(st.fixed_dictionaries({}, optional=good))
    if options.get("sliding") and options.get("unmask", "prefix") != "prefix":
        options["sliding"] = False  # sliding windows need the prefix rule
    if not good or draw(st.booleans()):
        return options, None
    name = draw(st.sampled_from(sorted(good) + ["colour"]))
    options[name] = draw(BAD_VALUES.get(name, st.nothing()) | any_value)
    return options, name


@pytest.fixture(scope="module")
def decoder_assets(tmp_path_factory, block_adapter):
    """A tiny Llama, an assets directory with heads (and their trees) and a block adapter."""
    from tests.conftest import fitted_heads

    model, adapter, valid = block_adapter
    assets = tmp_path_factory.mktemp("assets")
    fitted_heads(model, num_heads=3, steps=1).save_pretrained(assets / "heads")
    for rule in ["greedy", "tau1", "tau2", "tau3", "tau4"]:
        vadusa.Tree.chain(3).to_json(assets / "heads" / f"tree-{rule}.json")
    shutil.copytree(adapter, assets / "block")  # a copy: the block config property rewrites the original's config
    (assets / "block" / "block_config.json").write_text(json.dumps(valid))
    return model, assets


@settings(max_examples=budget(200), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_decoder_options_any_values(decoder_assets, data):
    """Valid options decode; one bad option (of build_decoder or of run) gives a user error naming it."""
    model, assets = decoder_assets
    name = data.draw(st.sampled_from(sorted(GOOD_BUILD)), label="decoder")
    options, bad = data.draw(options_with_one_bad(GOOD_BUILD[name]), label="build options")
    sampling, bad_run = data.draw(options_with_one_bad(GOOD_RUN) if bad is None else st.tuples(
        st.fixed_dictionaries({}, optional=GOOD_RUN), st.none()), label="run options")  # fmt: skip
    bad = bad or bad_run
    sampling.setdefault("max_new_tokens", 4)  # not the default 256: keep examples fast
    try:
        run = vadusa.build_decoder(name, model, assets, **options)
        out = run(PROMPT, generator=torch.Generator().manual_seed(0), **sampling)
    except USER_ERRORS as e:
        event(f"{type(e).__name__}: {str(e)[:40]}")
        assert bad is not None, f"valid options {options}, {sampling} refused: {e}"
        batch = isinstance(sampling["max_new_tokens"], list) and "batch" in str(e)  # per-row budgets: a batch
        conflict = batch or any(name in str(e) for name in options)  # e.g. batched block decoding needs sliding
        assert bad in str(e) or conflict or isinstance(e, FileNotFoundError), f"the error names no option {bad!r}: {e}"
        return
    event("decoded" if bad is None else f"bad {bad} accepted")
    new = out.sequences[0, PROMPT.shape[1] :]
    budget = sampling["max_new_tokens"]
    assert 1 <= out.new_tokens == len(new) <= (max(budget) if isinstance(budget, list) else budget)
    assert int(new.min()) >= 0 and int(new.max()) < model.config.vocab_size


# ----- what the properties found, pinned as plain tests -----
def test_found_tree_inputs_refused_clearly(tmp_path):
    with pytest.raises(ValueError, match="not a non-negative integer"):
        vadusa.Tree.from_paths([[True], [True, 0]])  # was accepted: bools as ranks
    with pytest.raises(ValueError, match="not a non-negative integer"):
        vadusa.Tree.from_paths([[2**70]])  # was accepted, then "Overflow when unpacking long" from the buffers
    with pytest.raises(TypeError, match="tree meta must be a dict"):
        vadusa.Tree.from_paths([[0]], meta="abc")  # was "dictionary update sequence element #0 has length 1"
    with pytest.raises(TypeError, match="tree path 5 is a int"):
        vadusa.Tree.from_paths([[0], 5])  # was "'int' object is not iterable"
    path = tmp_path / "t.json"
    for doc in (b"\xff\xfe[[0]]", b"[" * 100_000 + b"]" * 100_000, b'{"paths": [[0]], "meta": 3}'):
        path.write_bytes(doc)  # not UTF-8 (no file named), deep nesting (RecursionError), bad meta (no file named)
        with pytest.raises((ValueError, TypeError), match="t.json"):
            vadusa.Tree.from_json(path)


def test_found_heads_configs_refused_clearly(heads_dir):
    cases = [  # config.json -> the error; the first two allocated the config's sizes (2^53 floats) first
        ({"num_heads": 2**20, "vocab_size": 2**30}, "does not match .* 'block_bias' has shape"),
        ({"num_heads": 2**40}, "num_heads an integer in"),
        ({"hidden_size": 0}, "hidden_size an integer in"),
        ({"num_layers": True}, "field 'num_layers' must be int"),
        ({"colour": "red"}, r"unknown field\(s\) \['colour'\]"),
    ]
    for change, message in cases:
        (heads_dir / "config.json").write_text(json.dumps(HEADS_CONFIG | change))
        with pytest.raises(ValueError, match=message) as e:
            vadusa.DraftHeads.from_pretrained(heads_dir)
        assert str(heads_dir / "config.json") in str(e.value)


def test_found_block_configs_refused_clearly(block_adapter):
    from vadusa.blockdiff.student import load_student

    model, d, valid = block_adapter
    cases = [  # each was a TypeError from BlockConfig(**json) naming no file, or a traceback later on
        ({k: v for k, v in valid.items() if k != "vocab_size"}, r"lacks the field\(s\) \['vocab_size'\]"),
        (valid | {"block_size": "4"}, "field 'block_size' must be int"),
        (valid | {"block_size": 0}, "block_size, vocab_size must be >= 1"),
        (valid | {"mask_token_id": 99}, "mask_token_id 99 is outside the vocabulary"),
        (valid | {"extra": 1}, r"unknown field\(s\) \['extra'\]"),
        ([1, 2], "must hold a JSON object"),
    ]
    for config, message in cases:
        (d / "block_config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match=message) as e:
            load_student(model, d)
        assert str(d / "block_config.json") in str(e.value)
    (d / "block_config.json").write_text(json.dumps(valid))


def test_found_decoder_options_refused_clearly(decoder_assets):
    model, assets = decoder_assets
    run = vadusa.build_decoder("vadusa", model, assets, tree="chain")
    cases = [  # each was a traceback (or took the machine's memory) before any check
        (lambda: vadusa.build_decoder("vadusa", model, assets, tolerance=2**31), "tolerance must be an integer in"),
        (lambda: vadusa.build_decoder("vadusa", model, assets, tree=3), "tree must be 'auto', 'chain', a tree file"),
        (lambda: vadusa.build_decoder("block", model, assets, sliding="yes"), "sliding must be None, True or False"),
        (lambda: vadusa.build_decoder("block", model, assets, block_size=2**31), "block_size must be an integer in"),
        (lambda: run(PROMPT, eos_token_id="a"), "eos_token_id must be None, a token id >= 0"),
        (lambda: run(PROMPT, max_new_tokens=10**9), "max_new_tokens 1000000000 .* exceeds the model's 1024 positions"),
        (lambda: run(PROMPT, temperature=10**400), "temperature must be a finite number"),
    ]
    for call, message in cases:
        with pytest.raises((ValueError, TypeError), match=message):
            call()
    out = run(PROMPT, max_new_tokens=3, temperature=10**30, generator=torch.Generator().manual_seed(0))  # an int
    assert out.new_tokens == 3
    greedy = vadusa.generate_ar(model, PROMPT, max_new_tokens=5, temperature=0).sequences
    for name in ("ar", "block"):  # 1e-300 sent the top scores to inf: NaN probabilities, token 48 of 48, IndexError
        tiny = vadusa.build_decoder(name, model, assets)(PROMPT, max_new_tokens=5, temperature=1e-300)
        assert torch.equal(tiny.sequences, greedy) if name == "ar" else int(tiny.sequences.max()) < 48
