"""Modal's ``modal.volume`` module: ``from shoal.volume import FileEntry, FileEntryType``."""

from shoal.sdk.volume import FileEntry, FileEntryType, Volume, VolumeInfo
from shoal.sdk.volume_upload import VolumeUploadBatch

__all__ = ["FileEntry", "FileEntryType", "Volume", "VolumeInfo", "VolumeUploadBatch"]
