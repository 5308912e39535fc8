"""specialize.engine: data, teacher, DeepSpeed trainer, evaluation and the `specialize` CLI."""
import os as _os
import sys as _sys


def drop_checkout_root_from_sys_path() -> None:
    """Take this checkout's root off sys.path (it is there when `python -m specialize...`, pytest or a
    launcher runs from the checkout). There, kernels/ is found as a top-level `kernels`, the name of
    Hugging Face's kernels package, which transformers imports as it loads a model: with that package
    installed the import fails on ours (ImportError), without it transformers loads ours under the wrong
    name. specialize.* is imported through its install mapping, so nothing needs the root on the path.
    Runs when specialize.engine is imported, which every entry point does before it loads a model."""
    # real paths: the GPU check imports the checkout through a `specialize -> checkout` link
    root = _os.path.dirname(_os.path.dirname(_os.path.realpath(__file__)))
    _sys.path[:] = [p for p in _sys.path if _os.path.realpath(p or _os.curdir) != root]
    shadow = getattr(_sys.modules.get("kernels"), "__file__", None)
    if shadow and _os.path.dirname(_os.path.dirname(_os.path.realpath(shadow))) == root:
        del _sys.modules["kernels"]  # loaded under that name before this ran: forget it


drop_checkout_root_from_sys_path()
