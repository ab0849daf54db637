"""Publishing trained adapters as their next versions, all or nothing.

1. save it under `checkpoints/<policy>/tmp-*`, write a sha256 manifest, and stage the version in
   Postgres (which numbers it);
2. rename the folder to `v<N>` (atomic on one filesystem): a crash before this leaves only a
   tmp folder, removed at the next start, and a staged version, marked failed;
3. load it on every engine (`POST /v1/load_lora_adapter`, vLLM's route, which `lightloop engine`
   serves too);
4. only when every engine confirmed, mark it live (the proxy switches at that instant, by NOTIFY);
   otherwise unload it where it was loaded, mark it failed with the reason, and keep the old live
   version.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import asyncpg
import httpx

from lightloop.store import (
    adapter_name,
    fail_version,
    list_versions,
    set_live,
    set_version_uri,
    stage_version,
)
from lightloop.trainer.errors import PublishError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


class Engine(Protocol):
    """What the trainer needs from a serving engine (vLLM or `lightloop engine`)."""

    url: str

    async def load_adapter(self, name: str, path: Path) -> None: ...

    async def unload_adapter(self, name: str) -> None: ...


class HttpEngine:
    """vLLM's runtime LoRA routes (`VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`, `--enable-lora`)."""

    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 120.0) -> None:
        self.url = url.rstrip("/").removesuffix("/v1")
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(timeout=timeout_s, headers=headers)

    async def load_adapter(self, name: str, path: Path) -> None:
        answer = await self._post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)})
        if answer.status_code == 400 and "already" in answer.text:
            return  # loaded by an earlier attempt of this same (immutable) version
        if answer.status_code != 200:
            raise PublishError(
                f"{self.url} refused adapter {name}: HTTP {answer.status_code}: {answer.text[:300]}"
            )

    async def unload_adapter(self, name: str) -> None:
        answer = await self._post("/v1/unload_lora_adapter", {"lora_name": name})
        if answer.status_code not in (200, 404) and "not found" not in answer.text.lower():
            raise PublishError(
                f"{self.url} could not unload {name}: HTTP {answer.status_code}: {answer.text[:300]}"
            )

    async def _post(self, path: str, body: dict[str, str]) -> httpx.Response:
        try:
            return await self._client.post(self.url + path, json=body)
        except httpx.HTTPError as exc:
            raise PublishError(f"{self.url} unreachable: {type(exc).__name__}: {exc}") from None

    async def close(self) -> None:
        await self._client.aclose()


def sha256_manifest(folder: Path) -> dict[str, str]:
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        files[str(path.relative_to(folder))] = digest.hexdigest()
    return files


def folder_digest(files: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class Published:
    version: int
    path: Path
    sha256: str


class Publisher:
    """Publishes the policy's adapter and its agents' adapters (`policy-planner`, ...): each has
    versions of its own, under `<root>/<adapter>/v<N>`; what one step changed goes live together."""

    def __init__(
        self,
        policy: str,
        base_model: str,
        root: Path,
        engines: Sequence[Engine],
        keep: int,
        agents: Sequence[str] = (),
    ) -> None:
        self.policy = policy
        self.base_model = base_model
        # The adapters' names (their versions' keys): the policy's own first, then its agents'.
        self.names = [policy, *agents]
        self.base = root.resolve()  # engines may run elsewhere: give them absolute paths
        self.root = self.base / policy
        self.engines = list(engines)
        self.keep = keep
        # The versions the latest publish call staged, by adapter (empty before it staged any).
        self.staged: dict[str, int] = {}
        for name in self.names:
            (self.base / name).mkdir(parents=True, exist_ok=True)
            for leftover in (self.base / name).glob("tmp-*"):
                shutil.rmtree(leftover, ignore_errors=True)  # a crash between save and rename

    def path_of(self, version: int, name: str | None = None) -> Path:
        return self.base / (name or self.policy) / f"v{version}"

    async def publish(self, conn: asyncpg.Connection, save: Callable[[Path], None]) -> Published:
        """The policy's own adapter alone (`publish_all`)."""
        return (await self.publish_all(conn, {self.policy: save}))[self.policy]

    async def publish_all(
        self, conn: asyncpg.Connection, saves: Mapping[str, Callable[[Path], None]]
    ) -> dict[str, Published]:
        """Save, stage, load on every engine, make live: every adapter in `saves` (name -> what
        writes it), all or nothing. A refusal by any engine for any adapter unloads every one
        loaded and fails every staged version; the live ones stay live. Making them live is one
        transaction, so the proxy switches every agent at the same instant.

        `staged` names the versions this call staged as soon as they are, so that a caller whose
        connection broke can tell afterwards whether they went live. A file that cannot be
        written (a full disk) is a PublishError, not an outage; no temporary folder outlives a
        failed call."""
        assert saves and set(saves) <= set(self.names), f"unknown adapters: {set(saves) - set(self.names)}"
        self.staged = {}
        written: dict[str, Path] = {}
        digests: dict[str, str] = {}
        try:
            for name, save in saves.items():
                written[name], digests[name] = await self._write(name, save)
            for name in saves:
                staged = await stage_version(conn, name, base_model=self.base_model, sha256=digests[name])
                self.staged[name] = staged.version
        except BaseException:
            for tmp in written.values():
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        finals: dict[str, Path] = {}
        try:
            for name, version in self.staged.items():
                final = self.path_of(version, name)
                if final.exists():  # a version number reused after a database reset
                    shutil.rmtree(final)
                os.rename(written.pop(name), final)  # atomic: the folder appears whole or not at all
                finals[name] = final
                await set_version_uri(conn, name, version, final.as_uri())
        except OSError as exc:
            await self._fail_staged(conn, f"cannot move an adapter into place: {exc}")
            raise PublishError(f"cannot move an adapter into place under {self.base}: {exc}") from None
        finally:
            for tmp in written.values():  # those not moved yet (an outage may cut this short)
                shutil.rmtree(tmp, ignore_errors=True)
        loaded: list[tuple[Engine, str]] = []
        try:
            for name, version in self.staged.items():
                for engine in self.engines:
                    await engine.load_adapter(adapter_name(name, version), finals[name])
                    loaded.append((engine, adapter_name(name, version)))
        except PublishError as exc:
            for engine, lora in loaded:
                try:
                    await engine.unload_adapter(lora)
                except PublishError as undo:
                    log.warning("rollback: %s", undo)
            await self._fail_staged(conn, str(exc))
            raise
        async with conn.transaction():  # set_live's own transactions become savepoints of this one
            for name, version in self.staged.items():
                await set_live(conn, name, version)
        for name, version in self.staged.items():
            log.info("%s: version %d is live on %d engine(s)", name, version, len(self.engines))
            try:
                await self._unload_old(conn, name, version)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                # The version is live: housekeeping that failed must not make it look unpublished.
                log.warning("could not unload old versions of %s after publishing %d: %s", name, version, exc)
        return {
            name: Published(version, finals[name], digests[name]) for name, version in self.staged.items()
        }

    async def _write(self, name: str, save: Callable[[Path], None]) -> tuple[Path, str]:
        """The adapter saved in a temporary folder with its manifest: (folder, digest)."""
        root = self.base / name
        try:
            tmp = Path(tempfile.mkdtemp(prefix="tmp-", dir=root))
        except OSError as exc:
            raise PublishError(f"cannot write under {root}: {exc}") from None
        try:
            # In a thread: exporting gathers weights (seconds on large models) and the event
            # loop keeps the heartbeat and the claim's lease going meanwhile.
            await asyncio.to_thread(save, tmp)
            files = sha256_manifest(tmp)
            (tmp / MANIFEST).write_text(json.dumps(files, indent=1, sort_keys=True))
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, OSError):
                raise PublishError(f"cannot write the adapter under {root}: {exc}") from None
            raise
        return tmp, folder_digest(files)

    async def _fail_staged(self, conn: asyncpg.Connection, reason: str) -> None:
        for name, version in self.staged.items():
            await fail_version(conn, name, version, reason)

    async def _unload_old(self, conn: asyncpg.Connection, name: str, live: int) -> None:
        """Keep the newest `keep` versions loaded; agents still finishing a rollout on one of them
        are served, older ones are unloaded (their folders stay on disk)."""
        for version in await list_versions(conn, name):
            if version.version <= live - self.keep and version.status == "retired":
                for engine in self.engines:
                    try:
                        await engine.unload_adapter(adapter_name(name, version.version))
                    except PublishError as exc:
                        log.warning("could not unload an old version: %s", exc)

    async def unload(self, version: int, name: str | None = None) -> None:
        """Unload `version` of adapter `name` (the policy's by default) from every engine that
        has it (best effort)."""
        for engine in self.engines:
            try:
                await engine.unload_adapter(adapter_name(name or self.policy, version))
            except PublishError as exc:
                log.warning("could not unload version %d: %s", version, exc)

    async def restore(self, conn: asyncpg.Connection) -> dict[str, int]:
        """Make sure every adapter's live version is loaded on every engine (after an engine
        restart); the live versions, by adapter."""
        restored: dict[str, int] = {}
        for name in self.names:
            live = [v for v in await list_versions(conn, name) if v.status == "live"]
            if not live:
                continue
            version = live[0].version
            for engine in self.engines:
                await engine.load_adapter(adapter_name(name, version), self.path_of(version, name))
            restored[name] = version
        return restored
