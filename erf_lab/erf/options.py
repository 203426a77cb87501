"""The ERF protocol's named choices (:class:`ERFOptions`), the presets that fix them, and the
run settings that every stage of the engine reads (:class:`Settings`, validated once)."""
import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple, Union

from ..errors import ErfLabError
from ..layers import LAYOUTS as LAYER_LAYOUTS

__all__ = ["ERFOptions", "PRESETS", "OPTION_NAMES", "OPTION_CHOICES", "UNSET", "resolve_options", "Settings",
           "BACKENDS", "CENTER_MODES", "LAYOUTS"]

UNSET: Any = object()  # "not given": the preset's choice stands

BACKENDS = ("engine", "captum")
CENTER_MODES = ("rf", "array")
LAYOUTS = ("auto",) + LAYER_LAYOUTS  # "auto": detected (erf_lab.layers.spatial_grid)


# the values each ERFOptions field takes (the CLI's --target-rectify ... flags read them)
OPTION_CHOICES: Dict[str, Tuple[Optional[str], ...]] = {
    "target_rectify": (None, "relu"),
    "target_reduction": ("sum", "mean"),
    "grad_rectify": (None, "relu", "abs", "square"),
    "color_reduction": ("sum", "mean"),
    "map_rectify": (None, "clamp"),
    "normalize": (None, "log_max", "max", "sum"),
}


@dataclass(frozen=True)
class ERFOptions:
    """The named choices of an ERF protocol.

    Attributes:
        target_rectify: ``"relu"`` or None: applied to the unit's channel vector.
        target_reduction: ``"sum"`` or ``"mean"`` over channels.
        grad_rectify: ``"relu"``, ``"abs"``, ``"square"`` or None: per colour channel of the gradient.
        color_reduction: ``"sum"`` or ``"mean"`` over colour channels.
        map_rectify: ``"clamp"`` (at 0, after the colour reduction, per image) or None.
        normalize: display transform of the aggregate: ``"log_max"`` (log10(x+1)/max),
            ``"max"``, ``"sum"`` or None.
    """

    target_rectify: Optional[str] = "relu"
    target_reduction: str = "sum"
    grad_rectify: Optional[str] = "relu"
    color_reduction: str = "sum"
    map_rectify: Optional[str] = None
    normalize: Optional[str] = "log_max"

    def __post_init__(self) -> None:
        for name, values in OPTION_CHOICES.items():
            if getattr(self, name) not in values:
                raise ErfLabError(f"{name} must be one of {values}, got {getattr(self, name)!r}")


PRESETS: Dict[str, ERFOptions] = {
    # RepLKNet erf/: relu(y[:, :, u]).sum(); relu(grad) summed over colour; mean; log10(x+1)/max.
    "replknet": ERFOptions("relu", "sum", "relu", "sum", None, "log_max"),
    # Luo et al. 2016: gradient 1 at u on every channel, signed colour sum.
    "luo": ERFOptions(None, "sum", None, "sum", None, "max"),
    # OpenERF: mean over channels of the raw activation; mean over colour, clamp at 0; sum to 1.
    "openerf": ERFOptions(None, "mean", None, "mean", "clamp", "sum"),
}

OPTION_NAMES: Tuple[str, ...] = tuple(f.name for f in dataclasses.fields(ERFOptions))


def resolve_options(preset: Union[str, ERFOptions], **overrides: Any) -> ERFOptions:
    """The preset (a name of :data:`PRESETS` or an :class:`ERFOptions`) with the given
    :data:`OPTION_NAMES` overridden; arguments left at :data:`UNSET` keep the preset's choice."""
    if isinstance(preset, ERFOptions):
        base = preset
    elif preset in PRESETS:
        base = PRESETS[preset]
    else:
        raise ErfLabError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    unknown = sorted(set(overrides) - set(OPTION_NAMES))
    if unknown:
        raise ErfLabError(f"unknown ERF option(s) {', '.join(unknown)}; the options are {', '.join(OPTION_NAMES)}")
    return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not UNSET})


@dataclass(frozen=True)
class Settings:
    """How one :func:`erf_lab.erf.compute_erf` call runs, apart from the protocol
    (the arguments of the same names; checked on construction)."""

    preset: str = "replknet"  # the preset's name ("custom" for an ERFOptions given as the preset)
    layer: Optional[str] = None
    unit: Any = "center"
    output_index: Union[int, str, None] = None
    layout: str = "auto"
    prefix_tokens: Optional[int] = None
    num_images: Optional[int] = None
    sampling: str = "random"
    seed: int = 0
    batch_size: Union[int, str] = "auto"
    image_size: Optional[Tuple[int, int]] = None
    center: str = "rf"
    crop: Union[bool, str] = "auto"
    stop_at_layer: bool = True
    cone: bool = True
    channels_last: Union[bool, str] = "auto"
    fold_bn: bool = True
    backend: str = "engine"
    progress: bool = True
    distributed: Optional[bool] = None

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ErfLabError(f"backend must be 'engine' or 'captum', got {self.backend!r}")
        if self.center not in CENTER_MODES:
            raise ErfLabError(f"center must be 'rf' or 'array', got {self.center!r}")
        b = self.batch_size
        if b != "auto" and (isinstance(b, bool) or not isinstance(b, int) or b < 1):
            raise ErfLabError(f"batch_size must be an integer >= 1 or 'auto', got {b!r}")
        size = self.image_size
        if isinstance(size, int):
            object.__setattr__(self, "image_size", (size, size))
        elif size is not None:
            object.__setattr__(self, "image_size", tuple(size))

    @property
    def engine(self) -> bool:
        """The engine's own backward (crop, cone and BN folding apply), not captum's."""
        return self.backend == "engine"

    @property
    def several_units(self) -> bool:
        """Whether ``unit`` names a list of units (a list of results is returned)."""
        u = self.unit
        return not (isinstance(u, str) or (u and not isinstance(list(u)[0], (tuple, list))))
