"""The "vadusa" decoder: draft heads + a sparse tree + an acceptance rule, bound to a model once.

    run = build_decoder("vadusa", model, assets=demo_dir, tree="auto", acceptance="typical")  # the preset
    out = run(input_ids, max_new_tokens=..., temperature=1.0, logits_processor=..., eos_token_id=..., generator=g)

Artifacts (all in the heads directory, default <assets>/heads):
    config.json + model.safetensors        the draft model: DraftHeads, or a FeatureDrafter ("kind": "feature")
    tree-<rule>.json                       the tree the builder chose for a rule ("greedy", "tau1".."tau4", "typical")
    adapter_config.json + adapter_model.safetensors   optional joint-mode LoRA, merged into a copy of the base
"""

import copy
import os
from pathlib import Path

from .accuracy import rule_name
from .checks import check_values
from .drafter import FeatureDrafter, load_drafter
from .dynamic import DynamicTree, check_drafter, dynamic_tree
from .generate import generate
from .heads import DraftHeads
from .train import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from .tree import Tree


def resolve_heads_dir(assets: Path | None, heads) -> Path:
    """The heads directory: `heads` (absolute, or relative to `assets`), default <assets>/heads."""
    if heads is None:
        if assets is None:
            raise ValueError("the vadusa decoder needs heads: pass heads=<dir> or an assets directory holding heads/")
        return Path(assets) / "heads"
    path = Path(heads)
    if not path.is_dir() and assets is not None and (Path(assets) / path).is_dir():
        path = Path(assets) / path
    if not path.is_dir():
        raise FileNotFoundError(f"draft heads directory {path} does not exist")
    return path


def resolve_tree(tree, heads, heads_dir: Path | None, acceptance: str, tolerance: int) -> Tree | DynamicTree:
    """A Tree from "auto" (the builder's choice for the rule), "chain", a JSON path, a Tree or a DynamicTree;
    checked against the heads."""
    path = None  # the tree file, named in errors
    if isinstance(tree, Tree | DynamicTree):
        resolved = tree
    elif tree is None or tree == "chain":
        resolved = Tree.chain(heads.max_depth)
    elif tree == "auto":
        path = heads_dir / f"tree-{rule_name(acceptance, tolerance)}.json" if heads_dir is not None else None
        if acceptance == "typical" and path is not None and not path.is_file():
            path = heads_dir / "tree-tau1.json"  # heads built before typical had its own table
        if path is None or not path.is_file():
            found = sorted(p.name for p in heads_dir.glob("tree-*.json")) if heads_dir else []
            raise FileNotFoundError(
                f"tree='auto' needs tree-{rule_name(acceptance, tolerance)}.json in the heads directory {heads_dir} "
                f"(found {found}); build it with `train_heads.py --build-trees`, or pass tree='chain' or a tree file"
            )
    elif isinstance(tree, str | os.PathLike):
        path = Path(tree)
    else:
        raise TypeError(f"tree must be 'auto', 'chain', a tree file or a Tree, got {type(tree).__name__} {tree!r}")
    if path is not None:
        resolved = Tree.from_json(path)
    try:
        resolved.validate_for(heads.max_depth, heads.config.vocab_size)
    except ValueError as e:
        if path is None:
            raise
        raise ValueError(f"tree file {path}: {e}") from e
    return resolved


def merged_copy(model, heads_dir: Path):
    """A copy of `model` with the joint-mode LoRA adapter in `heads_dir` merged in (the original is untouched)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(model), heads_dir).merge_and_unload().eval()


def vadusa_factory(
    model,
    assets: Path | None = None,
    heads=None,
    tree="auto",
    acceptance: str = "typical",
    tolerance: int = 3,
    typical_epsilon: float = 0.09,
    typical_alpha: float = 0.3,
    dynamic_nodes: int = 0,
    dynamic_width: int = 3,
):
    """Load the draft model (a directory, DraftHeads or FeatureDrafter), resolve the tree, merge a LoRA adapter
    if one sits beside the heads. Bad option values raise before anything is loaded.

    The preset is typical acceptance on the builder's tree for it: the fastest rule on the demo at AR's CER
    (README results); `acceptance="tolerance", tolerance=tau` is VADUSA's tolerance sampling.

    dynamic_nodes > 0: a dynamic tree (`vadusa.dynamic`, feature drafters) of that many nodes, grown per step
    with `dynamic_width`, instead of a static one (then `tree` must stay "auto")."""
    check_values(
        acceptance=acceptance, tolerance=tolerance, typical_epsilon=typical_epsilon, typical_alpha=typical_alpha
    )
    dynamic = dynamic_tree(dynamic_nodes, dynamic_width)
    if dynamic is not None and not (isinstance(tree, str) and tree == "auto"):
        raise ValueError(
            f"dynamic_nodes={dynamic_nodes} grows its own tree every step: it cannot be combined with tree={tree!r}"
        )
    heads_dir = None
    if not isinstance(heads, DraftHeads | FeatureDrafter):
        heads_dir = resolve_heads_dir(assets, heads)
        heads = load_drafter(heads_dir, model)
    heads.check_compatible(model)
    heads.eval().requires_grad_(False)
    if dynamic is not None:
        check_drafter(dynamic, heads)
    resolved = dynamic or resolve_tree(tree, heads, heads_dir, acceptance, tolerance)
    base = model
    if heads_dir is not None and (heads_dir / ADAPTER_CONFIG).is_file() and (heads_dir / ADAPTER_WEIGHTS).is_file():
        base = merged_copy(model, heads_dir)

    def run(input_ids, **kw):
        return generate(
            base,
            heads,
            input_ids,
            tree=resolved,
            acceptance=acceptance,
            tolerance=tolerance,
            typical_epsilon=typical_epsilon,
            typical_alpha=typical_alpha,
            **kw,
        )

    run.tree, run.heads, run.model = resolved, heads, base  # what was resolved, for reports
    return run
