"""The public API as data: every top-level name of `psgd_eqx`, with the signature of every
callable (parameter names, kinds and defaults) and of the public methods of every class.

`python -m tests.api_snapshot` writes `tests/data/public_api.json`;
`tests/test_public_api.py` compares the live package with it.
"""

import inspect
import json

import psgd_eqx


def _default(value) -> str:
    if value is inspect.Parameter.empty:
        return "<required>"
    return repr(value)


def _signature(fn) -> list[list[str]] | None:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    return [[p.name, p.kind.name, _default(p.default)] for p in sig.parameters.values()]


_METHODS = ("init", "apply", "update", "rescale", "as_matrix", "norm_lower_bound",
            "lipschitz", "step", "describe")


def snapshot() -> dict:
    out = {}
    for name in sorted(n for n in dir(psgd_eqx) if not n.startswith("_")):
        obj = getattr(psgd_eqx, name)
        if inspect.ismodule(obj):
            continue
        entry: dict = {"kind": type(obj).__name__ if not inspect.isclass(obj) else "class"}
        if inspect.isclass(obj):
            entry["methods"] = {
                m: _signature(getattr(obj, m)) for m in _METHODS if hasattr(obj, m)
            }
        elif callable(obj):
            entry["signature"] = _signature(obj)
        else:
            entry["value"] = repr(obj)
        out[name] = entry
    return out


if __name__ == "__main__":
    with open("tests/data/public_api.json", "w") as f:
        json.dump(snapshot(), f, indent=1, sort_keys=True)
        f.write("\n")
