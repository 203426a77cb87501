"""Progress bars over DataLoaders, shared by training, evaluation and feature extraction."""
from typing import Any

from torch.utils.data import DataLoader


def loader_bar(loader: DataLoader, **kwargs: Any):
    """A ``tqdm.auto`` bar over one pass of ``loader``.

    The bar gets an iterator, not the loader: ``tqdm.auto`` calls ``iter()`` on an iterable in
    its constructor and again to loop, which made a second loader iterator per pass (with workers:
    a second set of processes and prefetched batches thrown away, and generator draws that made
    the batch order depend on ``num_workers``).
    """
    from tqdm.auto import tqdm

    return tqdm(iter(loader), total=len(loader), **kwargs)
