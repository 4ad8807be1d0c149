"""A local git repository that Argo CD's repo-server reads as `file://<path>`: what a tenant's GitOps repository is."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

# Independent of the machine's git configuration (user, signing, hooks, default branch).
_GIT_ENV = {
    "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_SYSTEM": os.devnull, "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_AUTHOR_NAME": "keyless-envtest", "GIT_AUTHOR_EMAIL": "envtest@keyless.invalid",
    "GIT_COMMITTER_NAME": "keyless-envtest", "GIT_COMMITTER_EMAIL": "envtest@keyless.invalid",
}


class LocalGitRepository:
    """A non-bare repository on branch `branch`; `commit(files)` writes, stages and commits in one step."""

    def __init__(self, path: Path, branch: str = "main"):
        self.path = Path(path)
        self.branch = branch
        self.path.mkdir(parents=True, exist_ok=True)
        if not (self.path / ".git").exists():
            self._git("init", "--quiet", f"--initial-branch={branch}")

    @property
    def url(self) -> str:
        return f"file://{self.path}"

    def _git(self, *args: str) -> str:
        result = subprocess.run(["git", "-C", str(self.path), *args], capture_output=True, text=True,
                                env={**os.environ, **_GIT_ENV}, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"git {' '.join(args)} failed in {self.path}: {result.stderr.strip()}")
        return result.stdout.strip()

    def commit(self, files: dict[str, str], message: str) -> str:
        """Writes `files` (path relative to the repository -> content) and commits them; returns the SHA."""
        for relative, content in files.items():
            target = self.path / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(content)
        self._git("add", "--all")
        self._git("commit", "--quiet", "--allow-empty", "-m", message)
        return self.head()

    def head(self) -> str:
        return self._git("rev-parse", "HEAD")
