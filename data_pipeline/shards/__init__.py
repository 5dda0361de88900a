"""Writers: an ImageFolder or the synthetic generator -> webdataset shards or an FFCV .beton."""

from .beton_writer import write_beton
from .inputs import ImageFolderInput, Item, SyntheticInput
from .wds_writer import index_shards, write_wds

__all__ = ["ImageFolderInput", "Item", "SyntheticInput", "index_shards", "write_beton", "write_wds"]
