"""Minimal OCI images without a container engine: one layer from a few files, as an OCI archive.

Enough for statically linked programs (our Go-built kube-oidc-proxy and pause). The archive is what
`ctr images import` reads; the image name goes into both annotations containerd and other tools use.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

# containerd reads this annotation for the full name; other tools read the OCI one.
_CONTAINERD_NAME = "io.containerd.image.name"
_OCI_REF_NAME = "org.opencontainers.image.ref.name"


@dataclass(frozen=True)
class ImageFile:
    path: str  # absolute path inside the image
    content: bytes
    mode: int = 0o644


@dataclass(frozen=True)
class ImageSpec:
    name: str  # e.g. localhost/keyless/kube-oidc-proxy:d534f69bad96
    files: tuple[ImageFile, ...]
    entrypoint: tuple[str, ...]
    user: str = "65532:65532"
    env: tuple[str, ...] = ("PATH=/usr/local/bin:/usr/bin:/bin",)
    directories: tuple[str, ...] = ("tmp",)
    labels: dict = field(default_factory=dict)


def _tar_info(name: str, *, size: int = 0, mode: int = 0o644, kind: bytes = tarfile.REGTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.type = size, mode, kind
    info.uid = info.gid = 0
    info.mtime = 0  # reproducible: the same files give the same digest
    return info


def _layer(spec: ImageSpec) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        parents: set[str] = set()
        wanted_dirs = [d.strip("/") for d in spec.directories]
        for f in spec.files:
            parts = f.path.strip("/").split("/")[:-1]
            wanted_dirs += ["/".join(parts[: i + 1]) for i in range(len(parts))]
        for directory in sorted(set(wanted_dirs)):
            if directory and directory not in parents:
                parents.add(directory)
                mode = 0o1777 if directory == "tmp" else 0o755
                tar.addfile(_tar_info(directory + "/", mode=mode, kind=tarfile.DIRTYPE))
        for f in sorted(spec.files, key=lambda f: f.path):
            tar.addfile(_tar_info(f.path.strip("/"), size=len(f.content), mode=f.mode), io.BytesIO(f.content))
    return buffer.getvalue()


def _blob(tar: tarfile.TarFile, data: bytes) -> dict:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    tar.addfile(_tar_info(f"blobs/sha256/{digest[7:]}", size=len(data)), io.BytesIO(data))
    return {"digest": digest, "size": len(data)}


def write_oci_archive(spec: ImageSpec, out: Path) -> Path:
    """Writes `spec` as an OCI image-layout tar archive at `out` (atomically) and returns it."""
    layer = _layer(spec)
    compressed = gzip.compress(layer, mtime=0)
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"User": spec.user, "Entrypoint": list(spec.entrypoint), "Env": list(spec.env),
                   "WorkingDir": "/", "Labels": dict(spec.labels)},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(layer).hexdigest()]},
        "history": [{"created_by": "keyless.envtest.images", "comment": "one layer of static files"}],
    }
    tmp = out.with_suffix(out.suffix + ".tmp")
    with tarfile.open(tmp, "w") as tar:
        layer_desc = _blob(tar, compressed)
        config_desc = _blob(tar, json.dumps(config, sort_keys=True).encode())
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config_desc},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **layer_desc}],
        }
        manifest_desc = _blob(tar, json.dumps(manifest, sort_keys=True).encode())
        index = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json", **manifest_desc,
                "platform": {"architecture": "amd64", "os": "linux"},
                "annotations": {_CONTAINERD_NAME: spec.name, _OCI_REF_NAME: spec.name},
            }],
        }
        for name, data in (("oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode()),
                           ("index.json", json.dumps(index, sort_keys=True).encode())):
            tar.addfile(_tar_info(name, size=len(data)), io.BytesIO(data))
    tmp.replace(out)
    return out


def static_binary_image(name: str, binary: Path, *, path: str, user: str = "65532:65532",
                        args: tuple[str, ...] = ()) -> ImageSpec:
    """An image holding one static binary at `path`, run as `user` (numeric, so runAsNonRoot can check it)."""
    return ImageSpec(name=name, files=(ImageFile(path, binary.read_bytes(), 0o755),),
                     entrypoint=(path, *args), user=user)
