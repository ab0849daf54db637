"""Publishing a trained adapter as the next policy version, all or nothing.

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import asyncpg
import httpx

from lightloop.store import adapter_name, fail_version, list_versions, set_live, stage_version
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
    def __init__(
        self, policy: str, base_model: str, root: Path, engines: Sequence[Engine], keep: int
    ) -> None:
        self.policy = policy
        self.base_model = base_model
        self.root = (root / policy).resolve()  # engines may run elsewhere: give them absolute paths
        self.engines = list(engines)
        self.keep = keep
        # The version the latest publish call staged (None before it staged one).
        self.staged: int | None = None
        self.root.mkdir(parents=True, exist_ok=True)
        for leftover in self.root.glob("tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)  # a crash between save and rename

    def path_of(self, version: int) -> Path:
        return self.root / f"v{version}"

    async def publish(self, conn: asyncpg.Connection, save: Callable[[Path], None]) -> Published:
        """Save, stage, load on every engine, make live. `staged` names the version this call
        staged as soon as it is, so that a caller whose connection broke can tell afterwards
        whether it went live. A file that cannot be written (a full disk) is a PublishError, not
        an outage; the temporary folder never outlives a failed call."""
        self.staged = None
        try:
            tmp = Path(tempfile.mkdtemp(prefix="tmp-", dir=self.root))
        except OSError as exc:
            raise PublishError(f"cannot write under {self.root}: {exc}") from None
        try:
            try:
                # In a thread: exporting gathers weights (seconds on large models) and the event
                # loop keeps the heartbeat and the claim's lease going meanwhile.
                await asyncio.to_thread(save, tmp)
                files = sha256_manifest(tmp)
                (tmp / MANIFEST).write_text(json.dumps(files, indent=1, sort_keys=True))
            except OSError as exc:
                raise PublishError(f"cannot write the adapter under {self.root}: {exc}") from None
            digest = folder_digest(files)
            staged = await stage_version(conn, self.policy, base_model=self.base_model, sha256=digest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.staged = staged.version
        final = self.path_of(staged.version)
        try:
            if final.exists():  # a version number reused after a database reset
                shutil.rmtree(final)
            os.rename(tmp, final)  # atomic: the version folder appears whole or not at all
            await conn.execute(
                "UPDATE policy_versions SET uri = $3 WHERE policy = $1 AND version = $2",
                self.policy,
                staged.version,
                final.as_uri(),
            )
        except OSError as exc:
            await fail_version(conn, self.policy, staged.version, f"cannot write {final}: {exc}")
            raise PublishError(f"cannot move the adapter into {final}: {exc}") from None
        name = adapter_name(self.policy, staged.version)
        loaded: list[Engine] = []
        try:
            for engine in self.engines:
                await engine.load_adapter(name, final)
                loaded.append(engine)
        except PublishError as exc:
            for engine in loaded:
                try:
                    await engine.unload_adapter(name)
                except PublishError as undo:
                    log.warning("rollback: %s", undo)
            await fail_version(conn, self.policy, staged.version, str(exc))
            raise
        await set_live(conn, self.policy, staged.version)
        log.info(
            "policy %s: version %d is live on %d engine(s)", self.policy, staged.version, len(self.engines)
        )
        try:
            await self._unload_old(conn, staged.version)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            # The version is live: housekeeping that failed must not make it look unpublished.
            log.warning("could not unload old versions after publishing %d: %s", staged.version, exc)
        return Published(staged.version, final, digest)

    async def _unload_old(self, conn: asyncpg.Connection, live: int) -> None:
        """Keep the newest `keep` versions loaded; agents still finishing a rollout on one of them
        are served, older ones are unloaded (their folders stay on disk)."""
        for version in await list_versions(conn, self.policy):
            if version.version <= live - self.keep and version.status == "retired":
                for engine in self.engines:
                    try:
                        await engine.unload_adapter(adapter_name(self.policy, version.version))
                    except PublishError as exc:
                        log.warning("could not unload an old version: %s", exc)

    async def unload(self, version: int) -> None:
        """Unload `version` from every engine that has it (best effort)."""
        for engine in self.engines:
            try:
                await engine.unload_adapter(adapter_name(self.policy, version))
            except PublishError as exc:
                log.warning("could not unload version %d: %s", version, exc)

    async def restore(self, conn: asyncpg.Connection) -> int:
        """Make sure the live version is loaded on every engine (after an engine restart)."""
        live = [v for v in await list_versions(conn, self.policy) if v.status == "live"]
        if not live:
            return 0
        version = live[0].version
        for engine in self.engines:
            await engine.load_adapter(adapter_name(self.policy, version), self.path_of(version))
        return version
