"""The ``key=value,...`` option list of a data spec (``digits-ms:size=64,seed=0``,
``coco:ann.json:images:mode=full``): a leaf module both the spec parser and the data sets use."""
from typing import Dict

from ..errors import ErfLabError

__all__ = ["parse_options"]


def parse_options(text: str, where: str) -> Dict[str, str]:
    """``key=value,key=value`` -> dict (a bare first value is returned under ``""``)."""
    out: Dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "=" in part:
            key, value = (s.strip() for s in part.split("=", 1))
            if not key:
                raise ErfLabError(f"data spec {where!r}: empty option name in {part!r}")
            out[key] = value
        elif "" not in out and not out:
            out[""] = part
        else:
            raise ErfLabError(f"data spec {where!r}: option {part!r} is not of the form key=value")
    return out
