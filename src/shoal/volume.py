"""Modal's ``modal.volume`` module: ``from shoal.volume import FileEntry, FileEntryType``."""

from shoal.sdk.volume import Volume
from shoal.sdk.volume_upload import VolumeUploadBatch
from shoal.types import FileEntry, FileEntryType, VolumeInfo

__all__ = ["FileEntry", "FileEntryType", "Volume", "VolumeInfo", "VolumeUploadBatch"]
