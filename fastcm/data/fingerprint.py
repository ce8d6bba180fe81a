"""A cheap fingerprint of a training set, recorded in config.json and every checkpoint so that a resume on other data is
refused (fastcm.train.checkpoint.check_same_data): the dataset string it was loaded from, its size, image shape,
class count and the SHA-256 of up to 64 evenly spaced items (their float32 images in [-1, 1] and int64 labels).
Reading 64 items costs milliseconds for any dataset size; a changed split, subset, class layout or edited file
changes at least one of these fields in practice, and a deliberate switch is an explicit option
(``--allow-data-change``).
"""
import hashlib
from typing import Optional

import torch

SAMPLE_ITEMS = 64
COMPARED = ("size", "image_shape", "num_classes", "sample_sha256")  # "spec" may differ (a moved folder)


def data_fingerprint(dataset) -> dict:
    """{"spec", "size", "image_shape", "num_classes", "sample_sha256"} of an ArrayDataset or any map-style dataset of
    (image, label) pairs."""
    n = len(dataset)
    if n < 1:
        raise ValueError("dataset must hold at least one item")
    index = torch.linspace(0, n - 1, min(n, SAMPLE_ITEMS)).round().long().unique()
    if hasattr(dataset, "get_batch"):
        x, y = dataset.get_batch(index)
    else:
        items = [dataset[int(i)] for i in index]
        x = torch.stack([torch.as_tensor(img) for img, _ in items])
        y = torch.stack([torch.as_tensor(label) for _, label in items])
    h = hashlib.sha256()
    h.update(x.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    if y is not None:
        h.update(y.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
    return {"spec": getattr(dataset, "spec", None) or getattr(dataset, "name", type(dataset).__name__),
            "size": n, "image_shape": list(x.shape[1:]), "num_classes": getattr(dataset, "num_classes", None),
            "sample_sha256": h.hexdigest()}


def data_change(saved: Optional[dict], now: dict) -> Optional[str]:
    """None when ``now`` is the data ``saved`` describes (or nothing was saved), else one phrase saying how they
    differ."""
    if not isinstance(saved, dict):
        return None
    diff = [k for k in COMPARED if saved.get(k) != now.get(k)]
    if not diff:
        return None
    shown = ", ".join(f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in diff if k != "sample_sha256")
    if "sample_sha256" in diff:
        shown += (", " if shown else "") + "different items"
    return f"{saved.get('spec')!r} then, {now.get('spec')!r} now ({shown})"
