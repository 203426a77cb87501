"""The ERF engine: effective receptive fields by back-propagating a unit's activation to the image.

The ERF of output unit ``u`` of layer ``L`` is ``d target / d x`` where ``target`` reduces
``L``'s activation at ``u`` over channels; over a data set it is the mean over images of a
per-image reduction of the input gradient over colour channels (docs/design.md section 3).

:func:`compute_erf` runs the stages of this package in order (:func:`compute_layer_erfs`, in
:mod:`.multilayer`, runs them once for several layers on the same images):

* :mod:`.options` -- the protocol (:class:`ERFOptions`, :data:`PRESETS`) and the run's settings;
* :mod:`.sampling` -- the images: source, seeded selection, this process's shard, the loader;
* :mod:`.geometry` -- the layer's grid, the units and their theoretical-RF centres, the crop window;
* :mod:`.memory` -- the default layer and batch sizes within the memory the device has free;
* :mod:`.locality` -- the crop plan: a crop around the units' fields (and their cone) where the
  graph proves and the first batch verifies that the units see nothing else, else whole images;
* :mod:`.engine` -- the model prepared and restored, the batched backward, the accumulation;
* :mod:`.result` -- :class:`ERFResult`: the float64 map, its metadata, metrics, files and plots.
"""
from .compute import compute_erf, compute_erfs, instance_erf
from .multilayer import compute_layer_erfs
from .memory import CPU_BATCH_PIXELS, auto_batch_size, check_memory
from .options import OPTION_NAMES, PRESETS, ERFOptions, resolve_options
from .result import ERFResult

__all__ = ["compute_erf", "compute_erfs", "compute_layer_erfs", "instance_erf", "auto_batch_size", "check_memory", "ERFResult", "PRESETS", "ERFOptions",
           "OPTION_NAMES", "resolve_options", "CPU_BATCH_PIXELS"]
