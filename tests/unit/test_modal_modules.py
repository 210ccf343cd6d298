"""Modal's module paths resolve to shoal's objects, and ``install_as_modal`` keeps one copy of each module."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import shoal

SRC = Path(__file__).resolve().parents[2] / "src"


def test_modal_module_paths_hold_the_same_objects():
    from shoal.app import App
    from shoal.container_process import ContainerProcess
    from shoal.file_io import FileIO
    from shoal.file_pattern_matcher import FilePatternMatcher
    from shoal.image import Image
    from shoal.io_streams import StreamReader, StreamWriter
    from shoal.output import enable_output
    from shoal.sandbox import Sandbox, SandboxConnectCredentials
    from shoal.secret import Secret
    from shoal.stream_type import StreamType

    assert (App, ContainerProcess, FileIO, FilePatternMatcher, Image) == (
        shoal.App,
        shoal.ContainerProcess,
        shoal.FileIO,
        shoal.FilePatternMatcher,
        shoal.Image,
    )
    assert (StreamReader, StreamWriter, enable_output, Sandbox, Secret, StreamType) == (
        shoal.StreamReader,
        shoal.StreamWriter,
        shoal.enable_output,
        shoal.Sandbox,
        shoal.Secret,
        shoal.StreamType,
    )
    assert SandboxConnectCredentials.__name__ == "SandboxConnectCredentials"
    assert shoal.Error is shoal.exception.Error


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"},
    )


def test_install_as_modal_makes_modal_imports_resolve_to_shoal_once():
    res = _run(
        """
        import shoal
        shoal.install_as_modal()
        import modal
        import modal.exception
        from modal.container_process import ContainerProcess
        from modal.exception import NotFoundError
        from modal.sandbox import Sandbox
        from modal.stream_type import StreamType
        assert modal is shoal
        assert modal.exception is shoal.exception
        assert NotFoundError is shoal.exception.NotFoundError
        try:
            raise shoal.exception.NotFoundError("x")
        except modal.exception.NotFoundError:
            pass
        assert (ContainerProcess, Sandbox, StreamType) == (shoal.ContainerProcess, shoal.Sandbox, shoal.StreamType)
        shoal.install_as_modal()  # twice is fine
        try:
            import modal.functions  # not something shoal has
        except ModuleNotFoundError:
            print("ok")
        """
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"


def test_install_as_modal_refuses_when_another_modal_is_imported():
    res = _run(
        """
        import sys, types
        sys.modules["modal"] = types.ModuleType("modal")
        import shoal
        from shoal.exception import InvalidError
        try:
            shoal.install_as_modal()
        except InvalidError as exc:
            print(exc)
        """
    )
    assert res.returncode == 0, res.stderr
    assert "already imported" in res.stdout and "before anything imports modal" in res.stdout


MODAL_EXCEPTIONS = {
    "Error": ("Exception",),
    "AlreadyExistsError": ("Error",),
    "AuthError": ("Error",),
    "InternalError": ("Error",),
    "InvalidError": ("Error",),
    "ConflictError": ("InvalidError",),
    "DataLossError": ("Error",),
    "NotFoundError": ("Error",),
    "PermissionDeniedError": ("Error",),
    "ResourceExhaustedError": ("Error",),
    "ServiceError": ("Error",),
    "UnimplementedError": ("Error",),
    "RemoteError": ("Error",),
    "WorkspaceManagementError": ("Error",),
    "TimeoutError": ("Error",),
    "SandboxTimeoutError": ("TimeoutError",),
    "SnapshotCreationError": ("Error",),
    "ExecTimeoutError": ("TimeoutError",),
    "SandboxTerminatedError": ("Error",),
    "FunctionTimeoutError": ("TimeoutError",),
    "MountUploadTimeoutError": ("TimeoutError",),
    "VolumeUploadTimeoutError": ("TimeoutError",),
    "LogsFetchError": ("Error",),
    "InteractiveTimeoutError": ("TimeoutError",),
    "OutputExpiredError": ("TimeoutError",),
    "ConnectionError": ("Error",),
    "VersionError": ("Error",),
    "ExecutionError": ("Error",),
    "DeserializationError": ("Error",),
    "SerializationError": ("Error",),
    "RequestSizeError": ("Error",),
    "DeprecationError": ("UserWarning",),
    "ServerWarning": ("UserWarning",),
    "AsyncUsageWarning": ("UserWarning",),
    "InternalFailure": ("Error",),
    "InputCancellation": ("BaseException",),
    "ModuleNotMountable": ("Exception",),
    "ClientClosed": ("Error",),
    "FilesystemExecutionError": ("Error",),
    "SandboxFilesystemError": ("Error",),
    "SandboxFilesystemNotFoundError": ("SandboxFilesystemError",),
    "SandboxFilesystemDirectoryNotEmptyError": ("SandboxFilesystemError",),
    "SandboxFilesystemIsADirectoryError": ("SandboxFilesystemError",),
    "SandboxFilesystemNotADirectoryError": ("SandboxFilesystemError",),
    "SandboxFilesystemPermissionError": ("SandboxFilesystemError",),
    "SandboxFilesystemFileTooLargeError": ("SandboxFilesystemError",),
    "SandboxFilesystemPathAlreadyExistsError": ("SandboxFilesystemError",),
    "ImageBuildError": ("RemoteError",),
}
"""Every public exception class of Modal's client (``modal/exception.py``) and its public bases."""


def test_every_modal_exception_exists_with_modals_bases():
    import builtins

    for name, bases in MODAL_EXCEPTIONS.items():
        cls = getattr(shoal.exception, name, None)
        assert cls is not None, f"shoal.exception has no {name}"
        ours = tuple(b.__name__ for b in cls.__bases__)
        assert ours == bases, (name, ours, bases)
        for base in cls.__bases__:
            assert base is getattr(shoal.exception, base.__name__, None) or base is getattr(builtins, base.__name__)


def test_image_from_id_has_an_aio_form_and_checks_the_id():
    import asyncio

    import pytest

    image = asyncio.run(shoal.Image.from_id.aio("im-" + "A" * 22))
    assert isinstance(image, shoal.Image)
    assert isinstance(shoal.Image.from_id("im-" + "B" * 22), shoal.Image)
    with pytest.raises(shoal.exception.InvalidError, match="not an image id"):
        shoal.Image.from_id("sb-123")


def test_modal_types_holds_what_the_sdk_returns():
    from shoal import types
    from shoal.sdk import logs, secret, volume
    from shoal.sdk._sandbox_network import SandboxConnectCredentials

    assert (types.LogEntry, types.SecretInfo, types.VolumeInfo) == (logs.LogEntry, secret.SecretInfo, volume.VolumeInfo)
    assert (types.FileEntry, types.FileEntryType) == (volume.FileEntry, volume.FileEntryType)
    assert types.SandboxConnectCredentials is SandboxConnectCredentials
    assert [t.name for t in types.FileEntryType] == ["UNSPECIFIED", "FILE", "DIRECTORY", "SYMLINK", "FIFO", "SOCKET"]


def test_modal_config_reads_modal_variables_and_defaults():
    res = _run(
        """
        import os
        os.environ.pop("MODAL_LOGLEVEL", None)
        os.environ["SHOAL_URL"] = "http://127.0.0.1:7777"
        import shoal
        shoal.install_as_modal()
        from modal.config import config, config_profiles, _profile
        import modal.config
        assert modal.config is shoal.config
        assert config.get("loglevel") == "WARNING" and config["traceback"] is False
        assert config.get("server_url") == "http://127.0.0.1:7777"
        config.override_locally("loglevel", "debug")
        assert os.environ["MODAL_LOGLEVEL"] == "debug" and config.get("loglevel") == "DEBUG"
        assert config.get("loglevel", use_env=False) == "WARNING"
        os.environ["MODAL_TRACEBACK"] = "1"
        os.environ["MODAL_LOGS_TIMEOUT"] = "2.5"
        assert config["traceback"] is True and config["logs_timeout"] == 2.5
        assert "loglevel" in config.to_dict() and config_profiles() == [_profile]
        try:
            config.get("no_such_setting")
        except KeyError:
            pass
        else:
            raise AssertionError("an unknown setting must be a KeyError")
        os.environ["MODAL_LOGS_TIMEOUT"] = "soon"
        try:
            config.get("logs_timeout")
        except shoal.exception.InvalidError as exc:
            print(exc)
        """
    )
    assert res.returncode == 0, res.stderr
    assert "Invalid value for logs_timeout" in res.stdout
