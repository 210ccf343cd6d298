"""Modal's ``modal.volume`` module: ``from shoal.volume import FileEntry, FileEntryType``."""

from shoal.sdk.volume import FileEntry, FileEntryType, Volume, VolumeInfo, VolumeUploadBatch

__all__ = ["FileEntry", "FileEntryType", "Volume", "VolumeInfo", "VolumeUploadBatch"]
