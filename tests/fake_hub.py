"""A stand-in for the Hugging Face Hub over a local folder, and a Hub cache filled from it.

FakeHub answers the HfApi calls publish makes. Each commit of a repo is a folder
<root>/<type>s/<namespace>/<name>/<commit>/ holding the whole tree, so a test can read exactly what a revision
holds; file metadata comes back as the Hub gives it (git blob ids, and LFS sha256 for binary files).
fill_cache() copies a revision into a Hub cache laid out as huggingface_hub's, so that the real snapshot_download
finds it with HF_HUB_OFFLINE=1; published_spaces() does both for staged Spaces, as `publish --push` and a Space's
first start would.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from types import SimpleNamespace

from huggingface_hub.hf_api import BlobLfsInfo, RepoSibling

from agegender.inference.hub import git_blob_sha

LFS_SUFFIXES = (".keras", ".tflite", ".h5", ".png", ".jpg")  # the Hub's default .gitattributes sends these to LFS


class HubError(Exception):
    """An HTTP error as huggingface_hub raises it: the status code is on .response."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.response = SimpleNamespace(status_code=status)


class FakeHub:
    def __init__(self, root: Path, user: str = "tester", orgs: dict[str, str] | None = None,
                 token_role: str = "write"):
        self.root = Path(root)
        self.user, self.orgs, self.token_role = user, orgs or {}, token_role
        self.heads: dict[tuple[str, str], list[str]] = {}  # (repo type, repo id) -> its commits, oldest first
        self.calls: list[tuple[str, dict]] = []
        self.refuse_create: set[str] = set()  # repo ids whose creation fails with HTTP 403

    def __call__(self, *args, **kwargs) -> FakeHub:  # stands in for the HfApi class too
        return self

    # ------------------------------------------------------------ what a test reads

    def head(self, repo_id: str, repo_type: str = "model") -> str:
        return self.heads[(repo_type, repo_id)][-1]

    def tree(self, repo_id: str, repo_type: str = "model", revision: str | None = None) -> Path:
        return self.root / f"{repo_type}s" / repo_id / (revision or self.head(repo_id, repo_type))

    def files(self, repo_id: str, repo_type: str = "model", revision: str | None = None) -> list[str]:
        tree = self.tree(repo_id, repo_type, revision)
        return sorted(p.relative_to(tree).as_posix() for p in tree.rglob("*") if p.is_file())

    def commits(self) -> list[dict]:
        return [kwargs for name, kwargs in self.calls if name == "create_commit"]

    # ------------------------------------------------------------ HfApi

    def whoami(self, token=None, **_):
        self.calls.append(("whoami", {"token": token}))
        return {"type": "user", "name": self.user,
                "orgs": [{"type": "org", "name": name, "roleInOrg": role} for name, role in self.orgs.items()],
                "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": self.token_role}}}

    def create_repo(self, repo_id, *, token=None, repo_type=None, exist_ok=False, private=False, space_sdk=None,
                    **_):
        self.calls.append(("create_repo", {"repo_id": repo_id, "repo_type": repo_type, "exist_ok": exist_ok,
                                           "private": private, "space_sdk": space_sdk}))
        if repo_id in self.refuse_create:
            raise HubError(403, f"403 Forbidden: you may not create {repo_id}")
        key = (repo_type or "model", repo_id)
        if key in self.heads and not exist_ok:
            raise HubError(409, f"409 Conflict: {repo_id} exists")
        if key not in self.heads:  # a new repo starts with the Hub's .gitattributes
            self.write_commit(key, {".gitattributes": b"*.keras filter=lfs diff=lfs merge=lfs -text\n"}, set())

    def repo_info(self, repo_id, *, repo_type=None, files_metadata=False, token=None, revision=None, **_):
        key = (repo_type or "model", repo_id)
        sha = revision or self.heads[key][-1]
        tree = self.tree(repo_id, key[0], sha)
        siblings = []
        for name in self.files(repo_id, key[0], sha):
            path = tree / name
            size = path.stat().st_size
            lfs = (BlobLfsInfo(size=size, sha256=hashlib.sha256(path.read_bytes()).hexdigest(), pointer_size=134)
                   if path.suffix in LFS_SUFFIXES else None)
            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{lfs and lfs.sha256}\nsize {size}\n"
            blob_id = (hashlib.sha1(f"blob {len(pointer)}\0{pointer}".encode()).hexdigest()  # noqa: S324
                       if lfs else git_blob_sha(path))
            siblings.append(RepoSibling(rfilename=name, size=size, blob_id=blob_id, lfs=lfs))
        return SimpleNamespace(id=repo_id, sha=sha, siblings=siblings)

    def hf_hub_download(self, repo_id, filename, *, revision=None, repo_type=None, token=None, **_):
        return str(self.tree(repo_id, repo_type or "model", revision) / filename)

    def create_commit(self, repo_id, operations, *, commit_message, repo_type=None, token=None,
                      parent_commit=None, **_):
        key = (repo_type or "model", repo_id)
        if parent_commit is not None and parent_commit != self.heads[key][-1]:
            raise HubError(412, "412 Precondition Failed: the branch moved since parent_commit")
        added = {op.path_in_repo: Path(op.path_or_fileobj).read_bytes() for op in operations
                 if hasattr(op, "path_or_fileobj")}
        deleted = {op.path_in_repo for op in operations if not hasattr(op, "path_or_fileobj")}
        self.calls.append(("create_commit", {"repo_id": repo_id, "repo_type": key[0], "message": commit_message,
                                             "added": sorted(added), "deleted": sorted(deleted)}))
        return SimpleNamespace(oid=self.write_commit(key, added, deleted))

    # ------------------------------------------------------------ changes made by someone else

    def put(self, repo_id: str, files: dict[str, bytes], repo_type: str = "model", deleted=()) -> str:
        """A commit made by hand on the Hub (not through publish)."""
        return self.write_commit((repo_type, repo_id), files, set(deleted))

    def write_commit(self, key: tuple[str, str], added: dict[str, bytes], deleted: set[str]) -> str:
        repo_type, repo_id = key
        parent = self.heads.get(key, [""])[-1]
        staging = self.root / f"{repo_type}s" / repo_id / ".next"
        shutil.rmtree(staging, ignore_errors=True)
        if parent:
            shutil.copytree(self.tree(repo_id, repo_type, parent), staging)
        staging.mkdir(parents=True, exist_ok=True)
        for name in deleted:
            (staging / name).unlink()
        for name, data in added.items():
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / name).write_bytes(data)
        digest = hashlib.sha1(parent.encode())
        for path in sorted(p for p in staging.rglob("*") if p.is_file()):
            digest.update(path.relative_to(staging).as_posix().encode() + hashlib.sha256(path.read_bytes()).digest())
        sha = digest.hexdigest()
        staging.rename(self.root / f"{repo_type}s" / repo_id / sha)
        self.heads.setdefault(key, []).append(sha)
        return sha


def fill_cache(cache_dir: Path, hub: FakeHub, repo_id: str, revision: str | None = None,
               repo_type: str = "model") -> Path:
    """Copy one revision of a FakeHub repo into a Hub cache (huggingface_hub's layout: snapshots/<commit>/ and
    refs/main naming the head); returns the snapshot folder."""
    storage = Path(cache_dir) / f"{repo_type}s--{repo_id.replace('/', '--')}"
    revision = revision or hub.head(repo_id, repo_type)
    snapshot = storage / "snapshots" / revision
    if not snapshot.exists():
        shutil.copytree(hub.tree(repo_id, repo_type, revision), snapshot)
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / "main").write_text(hub.head(repo_id, repo_type))
    return snapshot


def published_spaces(names: list[str], models_dir: Path, results_dir: Path, build_dir: Path, cache_dir: Path,
                     combined: bool = False, hub: FakeHub | None = None) -> dict:
    """Stage and push the models and Spaces of `names` to a FakeHub (publish's own code, namespace "tester"),
    then put each model's pushed revision in the Hub cache cache_dir: {Space name: StagedRepo}. A Space started
    with HF_HUB_CACHE=cache_dir and HF_HUB_OFFLINE=1 loads its models from there."""
    from tasks import publish

    hub = hub or FakeHub(Path(build_dir) / "fake-hub")
    models, spaces, _ = publish.stage(names, combined=combined, namespace=hub.user, models_dir=models_dir,
                                      results_dir=results_dir, build_dir=build_dir)
    publish.push(models, spaces, hub, "hf_not_a_real_token", hub.user, private=False)
    for repo in models:
        fill_cache(cache_dir, hub, repo.repo_id(hub.user))
    return {space.name: space for space in spaces}
