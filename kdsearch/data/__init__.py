"""kdsearch.data: data sets held as uint8 on the device, augmented views, and batch sources.

See docs/ARCHITECTURE.md ("data/"). :func:`load_data` turns a ``DataConfig`` into a
:class:`DataBundle` of uint8 splits; :func:`apply_views` / :func:`preprocess` turn uint8 batches
into model input on the device; :func:`make_batch_source` yields training batches.
"""

from __future__ import annotations

from kdsearch.data.augment import (
    ViewSpec,
    apply_views,
    gather_crops,
    identity_views,
    preprocess,
    sample_views,
)
from kdsearch.data.cifar import CIFAR_STATS, default_data_root
from kdsearch.data.datasets import IMAGENET_STATS, channel_stats, load_data
from kdsearch.data.decode import data_cache_dir
from kdsearch.data.imagefolder import StreamingImageFolder
from kdsearch.data.pipeline import (
    BatchSource,
    HostBatchSource,
    ResidentBatchSource,
    StreamingBatchSource,
    make_batch_source,
    share_pinned_train,
    should_be_resident,
)
from kdsearch.data.resize import resize_square_u8
from kdsearch.data.splits import (
    DataBundle,
    ImageSplit,
    SplitIndices,
    carve_splits,
    content_digest,
    data_fingerprint,
    stratified_split,
    stratified_subset,
)

__all__ = [
    # splits and bundle
    "ImageSplit",
    "DataBundle",
    "SplitIndices",
    "StreamingImageFolder",
    "carve_splits",
    "stratified_split",
    "stratified_subset",
    "content_digest",
    "data_fingerprint",
    # loading
    "load_data",
    "channel_stats",
    "CIFAR_STATS",
    "IMAGENET_STATS",
    "default_data_root",
    "data_cache_dir",
    "resize_square_u8",
    # views
    "ViewSpec",
    "sample_views",
    "identity_views",
    "apply_views",
    "preprocess",
    "gather_crops",
    # batches
    "BatchSource",
    "ResidentBatchSource",
    "HostBatchSource",
    "StreamingBatchSource",
    "make_batch_source",
    "share_pinned_train",
    "should_be_resident",
]
