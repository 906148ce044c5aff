"""The one check of every decoder option a user sets: each bad value gets the same clear ValueError.

    check_values(temperature=0.8, top_k=50, tolerance=0)
    # ValueError: tolerance must be an integer in [1, 1024], got 0

The decoders (`generate`, `generate_ar`, `blockdiff.generate`), their factories (`vadusa_factory`,
`block_factory`) and the CLIs call it, before anything is loaded, so the Python API and the command line
say the same thing. Conventions: temperature 0 is greedy; top_k None or 0, top_p 1 and min_p 0 are off;
block_size None is the adapter's own. Names without a rule here (tree, streamer, ...) are left to their users.
"""

import math

ACCEPTANCE_RULES = ("greedy", "tolerance", "typical", "lossless")  # vadusa.accept's rules
UNMASK_RULES = ("any", "prefix")  # block decoding: Fast-dLLM's rule, or only a leading run of targets
MAX_DRAWS = 1024  # largest tolerance (draws per node) and block size: buffers of that many rows are allocated


def is_real(value) -> bool:
    """A finite int or float (bool is not a number here)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return abs(value) < 1e300 if isinstance(value, int) else math.isfinite(value)  # isfinite(10**400) overflows


def is_integer(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, int)


def is_budget(value) -> bool:
    """max_new_tokens: an integer >= 1, or (a batch) a non-empty list / tuple of them, one per row."""
    if isinstance(value, list | tuple):
        return len(value) > 0 and all(is_integer(v) and v >= 1 for v in value)
    return is_integer(value) and value >= 1


# option name -> (test of a good value, what is expected: "<name> must be <expected>, got <value>")
RULES = {
    "temperature": (lambda v: is_real(v) and v >= 0, "a finite number >= 0 (0: greedy)"),
    "top_k": (lambda v: v is None or (is_integer(v) and v >= 0), "None or an integer >= 0 (None or 0: off)"),
    "top_p": (lambda v: is_real(v) and 0 < v <= 1, "in (0, 1] (1: off)"),
    "min_p": (lambda v: is_real(v) and 0 <= v <= 1, "in [0, 1] (0: off)"),
    "max_new_tokens": (is_budget, "an integer >= 1 (a batch: a list of them, one per row)"),
    "acceptance": (lambda v: v in ACCEPTANCE_RULES, f"one of {ACCEPTANCE_RULES}"),
    "tolerance": (lambda v: is_integer(v) and 1 <= v <= MAX_DRAWS, f"an integer in [1, {MAX_DRAWS}]"),
    "typical_epsilon": (lambda v: is_real(v) and 0 <= v <= 1, "in [0, 1]"),
    "typical_alpha": (lambda v: is_real(v) and v >= 0, "a finite number >= 0"),
    "threshold": (lambda v: is_real(v) and 0 < v <= 1, "in (0, 1]"),
    "block_size": (lambda v: v is None or (is_integer(v) and 1 <= v <= MAX_DRAWS), f"an integer in [1, {MAX_DRAWS}]"),
    "unmask": (lambda v: v in UNMASK_RULES, f"one of {UNMASK_RULES}"),
    "dynamic_nodes": (lambda v: is_integer(v) and 0 <= v <= 256, "an integer in [0, 256] (0: the static tree)"),
    "dynamic_width": (lambda v: is_integer(v) and 1 <= v <= 16, "an integer in [1, 16]"),
    "approximate_cache": (lambda v: isinstance(v, bool), "True or False"),
    "sliding": (lambda v: v is None or isinstance(v, bool), "None, True or False (None: on with unmask='prefix')"),
}


def check_values(**options) -> None:
    """Raise ValueError naming the first option whose value breaks its rule in `RULES` (in a list of per-row
    values, the first bad row: `max_new_tokens[2] must be ...`)."""
    for name, value in options.items():
        if name in RULES and not RULES[name][0](value):
            rows = enumerate(value) if isinstance(value, list | tuple) else []
            name, value = next(((f"{name}[{i}]", v) for i, v in rows if not RULES[name][0](v)), (name, value))
            raise ValueError(f"{name} must be {RULES[name.partition('[')[0]][1]}, got {value!r}")


def check_fields(config, at_least: dict[int, tuple[str, ...]], nonnegative: tuple[str, ...] = ()) -> None:
    """Raise ValueError naming the first field of a training config that is not an integer >= its bound
    (`at_least`: bound -> field names) or not a finite number >= 0 (`nonnegative`)."""
    for low, names in at_least.items():
        for name in names:
            value = getattr(config, name)
            if not is_integer(value) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    for name in nonnegative:
        value = getattr(config, name)
        if not is_real(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
