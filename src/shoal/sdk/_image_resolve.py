"""Resolving an image with build steps: the steps go to the daemon, which builds what is not cached and
streams the log back; local files are uploaded only when the daemon asks for them."""

from __future__ import annotations

import json
import time
from typing import Any

from shoal.exception import Error, ImageBuildError
from shoal.sdk import output
from shoal.sdk._image_build import PendingStep
from shoal.sdk._local_files import LocalTree
from shoal.sdk.secret import secret_ids
from shoal.sdk.transport import Client, error_from
from shoal.wire import routes
from shoal.wire.base import dump
from shoal.wire.images import ImageRef

MAX_UPLOAD_ROUNDS = 20
"""How often the daemon may ask for more local files before the client gives up."""


async def wire_steps(steps: list[PendingStep]) -> tuple[list[dict[str, Any]], dict[str, LocalTree]]:
    """The steps as the daemon takes them, and the local trees by context digest."""
    out: list[dict[str, Any]] = []
    trees: dict[str, LocalTree] = {}
    for step in steps:
        wire = dict(step.wire)
        if step.secrets:
            env: dict[str, str] = {}
            for s in step.secrets:
                env.update(s._as_env())
            if env:
                wire["secret_env"] = env
            named = await secret_ids(step.secrets)
            if named:
                wire["secret_ids"] = named
        if step.files is not None:
            step.files.reset()
            digest = step.files.digest()
            wire["context"] = digest
            trees[digest] = step.files
        out.append(wire)
    return out, trees


async def resolve(
    ref: dict[str, Any], steps: list[PendingStep], client: Client, cache: dict[tuple[str, str], str]
) -> str:
    """The image id, asking the daemon (which builds what is missing) and uploading local files it asks for."""
    wire_steps_, trees = await wire_steps(steps)
    body = dump(ImageRef, **ref, **({"steps": wire_steps_} if wire_steps_ else {}))
    forced = bool(body.get("force_build")) or any(s.get("force_build") for s in wire_steps_)
    key = (client.identity, json.dumps(body, sort_keys=True))
    if not forced and (cached := cache.get(key)) is not None:
        return cached
    if forced:  # a forced step replaces cached results: ids remembered in this process may be stale now
        for k in [k for k in cache if k[0] == client.identity]:
            del cache[k]
    for _ in range(MAX_UPLOAD_ROUNDS):
        final = await _post(client, body)
        if "missing_contexts" in final:
            for digest in final["missing_contexts"]:
                tree = trees.get(str(digest))
                if tree is None:
                    raise Error(f"the daemon asked for files this image does not have ({digest})")
                await upload(client, str(digest), tree)
            continue
        if "error" in final:
            err = error_from(400, json.dumps(final).encode())
            if isinstance(err, ImageBuildError):
                err.image_id = final["error"].get("image_id")
            raise err
        if "image_id" not in final:
            raise Error("the daemon ended the image build without a result")
        image_id = str(final["image_id"])
        cache[key] = image_id
        return image_id
    raise Error("the daemon kept asking for local files; giving up")


async def _post(client: Client, body: dict[str, Any]) -> dict[str, Any]:
    final: dict[str, Any] = {}
    buf = b""
    async for chunk in client.stream("POST", routes.path("images", "resolve"), json_body=body):
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            if not line.strip():
                continue
            item = json.loads(line)
            if "log" in item:
                output.log_line(str(item["log"]))
            elif "step" in item:
                show_step(item["step"])
            else:
                final = item
    return final


async def upload(client: Client, digest: str, tree: LocalTree) -> None:
    """Send one context's files (a tar stream)."""
    files = sum(1 for e in tree.manifest() if e[1] == "f")
    size = tree.total_bytes()
    started = time.monotonic()
    output.log_line(f"uploading {files} local file{'s' if files != 1 else ''} ({_human(size)})")
    url = client.base_url + routes.path("image-store", "contexts", digest)
    async with client._get_session().put(url, data=tree.tar_stream()) as resp:
        body = await resp.read()
        if resp.status >= 400:
            raise error_from(resp.status, body)
    output.log_line(f"uploaded in {time.monotonic() - started:.1f}s")


def show_step(event: dict[str, Any]) -> None:
    """A progress line for a build step (only with ``enable_output()``; a step found in the cache only when verbose,
    as Modal says nothing of an image it did not have to build)."""
    console = output.console()
    if console is None or (event.get("status") == "cached" and not output.is_verbose()):
        return
    where = f"[{event.get('index')}/{event.get('total')}]"
    label = str(event.get("label", ""))
    status = event.get("status")
    seconds = event.get("seconds")
    if status == "cached":
        console.print(f"[green]✓[/] {where} {_escape(label)} [dim](cached)[/]")
    elif status == "building":
        console.print(f"[bold cyan]→[/] {where} [bold]{_escape(label)}[/]")
    elif status in ("built", "done"):
        took = f" [dim]in {seconds:.1f}s[/]" if isinstance(seconds, int | float) and status == "built" else ""
        console.print(f"[green]✓[/] {where} {_escape(label)}{took}")
    elif status == "failed":
        console.print(f"[bold red]✗[/] {where} {_escape(label)} [red]failed[/]")


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text if len(text) <= 200 else text[:197] + "...")


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"
