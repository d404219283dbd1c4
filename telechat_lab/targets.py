"""What class a config's `_target_` names, asked before Hydra instantiates it: callers compare classes
(issubclass), not the text of the target."""

from __future__ import annotations

from typing import Any


def targets(node: Any, cls: type) -> bool:
    """Whether `node` (a config mapping) has a `_target_` that is `cls` or a subclass of it, resolved as
    hydra.utils.instantiate resolves it; False for one that does not resolve (instantiating it reports that)."""
    from hydra.utils import get_class

    target = node.get("_target_") if hasattr(node, "get") else None
    if not isinstance(target, str):
        return False
    try:
        return issubclass(get_class(target), cls)
    except Exception:  # not importable, or not a class: Hydra's own error names it when the node is instantiated
        return False
