"""Tar archives built in memory: well-formed members and the hostile archives every upload test sends."""

from __future__ import annotations

import io
import tarfile


def tar_bytes(entries):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def tar_member(name, data=b"x", kind=tarfile.REGTYPE, linkname=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data if kind == tarfile.REGTYPE else None


def hostile_archives(deployed):
    mlmodel = (deployed["onnx_linear"] / "MLmodel").read_bytes()
    model = (deployed["onnx_linear"] / "model.onnx").read_bytes()
    whole = tar_bytes([tar_member("MLmodel", mlmodel), tar_member("model.onnx", model)])
    return {
        "dot-dot": tar_bytes([tar_member("../escape", b"bad"), tar_member("MLmodel", mlmodel)]),
        "absolute": tar_bytes([tar_member("/tmp/arachne-escape", b"bad")]),
        "symlink out": tar_bytes([tar_member("link", kind=tarfile.SYMTYPE, linkname="/etc/passwd")]),
        "hardlink out": tar_bytes([tar_member("hard", kind=tarfile.LNKTYPE, linkname="../../outside")]),
        "device file": tar_bytes([tar_member("dev", kind=tarfile.CHRTYPE)]),
        "not a tar": b"hello, this is not a tar archive at all" * 20,
        "no MLmodel": tar_bytes([tar_member("model.onnx", model)]),
        "truncated": whole[: whole.index(model) + len(model) // 2],
    }


def model_tar(model_dir) -> bytes:
    """The tar a client uploads for an MLflow model directory (only the files its MLmodel names)."""
    from arachne_mlflow.model.archive import stream_tar
    from arachne_mlflow.model.directory import read_model_dir

    return b"".join(stream_tar(model_dir, read_model_dir(model_dir).files()))
