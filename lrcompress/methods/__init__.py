"""Methods: one module per factorization method, the registry that lists them (the only list), the
interface they implement (``base``), the layer-kind vocabulary (``kinds``) and applying a plan."""

from __future__ import annotations

from ..faces import lazy_face

__getattr__, __all__ = lazy_face(__name__, {
    "register": "registry",
    "get": "registry",
    "names": "registry",
    "method_config": "registry",
    "Method": "base",
    "Choice": "base",
    "Factorized": "base",
    "apply_plan": "apply",
    "LayerResult": "apply",
})
