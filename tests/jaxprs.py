"""Walking a jaxpr: the tests that check what a traced program does (or no longer does) share it."""
from __future__ import annotations

from typing import Any, Iterator


def equations(jaxpr: Any) -> Iterator[Any]:
    """Every equation of `jaxpr` and of the jaxprs nested in it (jitted jnp functions, scan and remat
    bodies, control flow), depth first."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
                    yield from equations(sub if hasattr(sub, "eqns") else sub.jaxpr)
