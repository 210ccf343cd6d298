"""shoal: self-hosted sandboxes for untrusted code, with Modal's Sandbox API.

``import shoal as modal`` and Modal's sandbox code runs on your own machine.
"""

from shoal import (
    app,
    container_process,
    exception,
    experimental,
    file_io,
    file_pattern_matcher,
    image,
    io_streams,
    output,
    sandbox,
    secret,
    snapshot,
    stream_type,
    types,
    volume,
)
from shoal._install import install_as_modal
from shoal.exception import Error
from shoal.sdk.app import App
from shoal.sdk.file_io import FileIO
from shoal.sdk.image import Image
from shoal.sdk.output import enable_output
from shoal.sdk.probe import Probe
from shoal.sdk.process import ContainerProcess
from shoal.sdk.sandbox import Sandbox
from shoal.sdk.secret import Secret
from shoal.sdk.snapshot import SandboxSnapshot
from shoal.sdk.streams import StreamReader, StreamType, StreamWriter
from shoal.sdk.tunnel import Tunnel
from shoal.sdk.volume import Volume
from shoal.types import FileInfo, FileType, FileWatchEvent, FileWatchEventType
from shoal.wire.ignore import FilePatternMatcher
from shoal.wire.version import __version__

__all__ = [
    "App",
    "ContainerProcess",
    "Error",
    "FileIO",
    "FileInfo",
    "FilePatternMatcher",
    "FileType",
    "FileWatchEvent",
    "FileWatchEventType",
    "Image",
    "Probe",
    "Sandbox",
    "SandboxSnapshot",
    "Secret",
    "StreamReader",
    "StreamType",
    "StreamWriter",
    "Tunnel",
    "Volume",
    "__version__",
    "app",
    "container_process",
    "enable_output",
    "exception",
    "experimental",
    "file_io",
    "file_pattern_matcher",
    "image",
    "install_as_modal",
    "io_streams",
    "output",
    "sandbox",
    "secret",
    "snapshot",
    "stream_type",
    "types",
    "volume",
]
