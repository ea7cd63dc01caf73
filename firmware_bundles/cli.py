"""``edgeloop keys ...`` and ``edgeloop bundle ...``.

Contract relied on by scripts and tests: every failure exits non-zero with
``error: <reason>`` as the last line of output (on stderr), printed unwrapped.
Only typer, rich, the standard library and this package are imported at module level.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from firmware_bundles.archive import sha256_file
from firmware_bundles.build import build_bundle, infer_role
from firmware_bundles.errors import BundleError
from firmware_bundles.keys import (
    DEFAULT_KEY_NAME,
    TrustStore,
    key_id,
    load_private_key,
    load_public_key,
    write_key_pair,
)
from firmware_bundles.manifest import DEFAULT_MIN_AGENT_VERSION
from firmware_bundles.oci import ARCHITECTURES, DEFAULT_ARCHITECTURE, OciImage, export_oci
from firmware_bundles.oci_extract import extract_oci
from firmware_bundles.onnx_meta import OnnxMetadataError, parse_imgsz, parse_names, read_onnx_metadata
from firmware_bundles.reader import DEFAULT_MAX_BYTES
from firmware_bundles.sign import sign_bundle
from firmware_bundles.summary import inspect_bundle, summary_rows
from firmware_bundles.verify import verify_bundle

keys_app = typer.Typer(help="Ed25519 keys that sign model bundles.", no_args_is_help=True)
bundle_app = typer.Typer(help="Build, sign, verify and inspect signed model bundles.", no_args_is_help=True)


def _fail(reason: str) -> NoReturn:
    # typer.echo, not rich: rich would wrap a long reason over several lines.
    typer.echo(f"error: {reason}", err=True)
    raise typer.Exit(1)


@contextlib.contextmanager
def _reported() -> Iterator[None]:
    """Turn expected failures into the one-line ``error:`` contract instead of a traceback."""
    try:
        yield
    except (BundleError, OnnxMetadataError) as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": "))
    except ValueError as exc:
        _fail(str(exc).replace("\n", "; "))


def _check_architecture(value: str) -> str:
    if value not in ARCHITECTURES:
        raise typer.BadParameter(f"{value!r} is not one of: {', '.join(ARCHITECTURES)}")
    return value


def _echo_image(image: OciImage) -> None:
    typer.echo(f"oci image: {image.path} (tag {image.ref_name}, {image.architecture})")
    typer.echo(f"image digest: {image.manifest_digest}")
    typer.echo(f"layer digest: {image.layer_digest}")


# -- keys -----------------------------------------------------------------------------


@keys_app.command("generate")
def keys_generate(
    out: Annotated[Path, typer.Option("--out", help="Folder for <name>.pem (private) and <name>.pub.pem.")],
    name: Annotated[str, typer.Option(help="Base file name of the pair.")] = DEFAULT_KEY_NAME,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing pair.")] = False,
) -> None:
    """Generate an ed25519 signing key pair; prints its key id."""
    with _reported():
        private_path, public_path, kid = write_key_pair(out, name=name, overwrite=force)
    typer.echo(f"private key: {private_path} (mode 0600, keep it secret)")
    typer.echo(f"public key:  {public_path}")
    typer.echo(f"key id: {kid}")


@keys_app.command("id")
def keys_id(key: Annotated[Path, typer.Argument(help="A public or private key PEM file.")]) -> None:
    """Print the key id of a key file."""
    with _reported():
        is_private = b"PRIVATE KEY" in key.read_bytes()
        public = load_private_key(key).public_key() if is_private else load_public_key(key)
    typer.echo(key_id(public))


# -- bundle ---------------------------------------------------------------------------


def _class_names(class_names: str | None, labels: Path | None, metadata: dict[str, str] | None) -> list[str]:
    if class_names is not None and labels is not None:
        raise ValueError("give --class-names or --labels, not both")
    if class_names is not None:
        return [name.strip() for name in class_names.split(",") if name.strip()]
    if labels is not None:
        return [line.strip() for line in labels.read_text(encoding="utf-8").splitlines() if line.strip()]
    if metadata is None:
        raise ValueError(
            "no class names: pass --class-names or --labels (install onnx to read them from the model)"
        )
    if "names" not in metadata:
        raise ValueError("no class names: the model has no 'names' metadata; pass --class-names or --labels")
    return parse_names(metadata["names"])


def _imgsz(imgsz: int | None, metadata: dict[str, str] | None) -> int:
    if imgsz is not None:
        return imgsz
    if metadata is None:
        raise ValueError("no image size: pass --imgsz (install onnx to read it from the model)")
    if "imgsz" not in metadata:
        raise ValueError("no image size: the model has no 'imgsz' metadata; pass --imgsz")
    return parse_imgsz(metadata["imgsz"])


def _model_metadata(model: Path) -> dict[str, str] | None:
    try:
        return read_onnx_metadata(model)
    except Exception as exc:  # onnx raises protobuf DecodeError and friends, with no common base
        raise ValueError(f"cannot read ONNX metadata from {model} ({type(exc).__name__}: {exc})") from None


@bundle_app.command("build")
def bundle_build(
    model: Annotated[Path, typer.Option("--model", help="The ONNX model.")],
    version: Annotated[int, typer.Option("--version", min=1, help="Bundle version (integer, >= 1).")],
    key: Annotated[Path, typer.Option("--key", help="Private signing key (PEM).")],
    out: Annotated[Path, typer.Option("--out", help="Bundle file to write.")],
    name: Annotated[
        str | None, typer.Option("--name", help="Model name (default: the model file stem).")
    ] = None,
    class_names: Annotated[
        str | None, typer.Option("--class-names", help="Comma-separated class names, in class id order.")
    ] = None,
    labels: Annotated[
        Path | None, typer.Option("--labels", help="File with one class name per line.")
    ] = None,
    imgsz: Annotated[int | None, typer.Option("--imgsz", min=1, help="Square input size in pixels.")] = None,
    extra_files: Annotated[
        list[Path] | None, typer.Option("--file", help="Extra file to include (repeatable).")
    ] = None,
    min_agent_version: Annotated[
        str, typer.Option("--min-agent-version", help="Oldest agent that may install this bundle.")
    ] = DEFAULT_MIN_AGENT_VERSION,
    oci: Annotated[
        Path | None,
        typer.Option("--oci", help="Also write the signed bundle as an OCI image archive (oci-archive) here."),
    ] = None,
    oci_arch: Annotated[
        str,
        typer.Option("--oci-arch", callback=_check_architecture, help="Platform of the OCI image (GOARCH)."),
    ] = DEFAULT_ARCHITECTURE,
) -> None:
    """Build and sign a bundle. Class names and image size default to the ONNX model's metadata."""
    with _reported():
        if not model.is_file():
            raise ValueError(f"model not found: {model}")
        if oci is not None and oci.resolve() == out.resolve():
            raise ValueError("--oci and --out must be different files")
        # Only open the model with onnx when a flag is missing: a build with full flags needs no onnx.
        needs_metadata = imgsz is None or (class_names is None and labels is None)
        metadata = _model_metadata(model) if needs_metadata else {}
        names = _class_names(class_names, labels, metadata)
        size = _imgsz(imgsz, metadata)
        files = {model.name: model}
        roles = {}
        for extra in extra_files or []:
            if extra.name in files:
                raise ValueError(f"two files would be stored as {extra.name!r}")
            files[extra.name] = extra
            # Extra files never become runtimes; only labels keep their role.
            roles[extra.name] = "labels" if infer_role(extra.name) == "labels" else "extra"
        manifest = build_bundle(
            out,
            files,
            private_key=load_private_key(key),
            model_name=name or model.stem,
            version=version,
            class_names=names,
            input_spec=size,
            roles=roles,
            min_agent_version=min_agent_version,
        )
        digest = sha256_file(out)
        image = export_oci(out, oci, architecture=oci_arch) if oci is not None else None
    typer.echo(
        f"built {out}: {manifest.model_name} version {manifest.version}, {len(manifest.files)} file(s)"
    )
    typer.echo(f"signed by key {manifest.key_id}")
    typer.echo(f"sha256: {digest}")
    if image is not None:
        _echo_image(image)


@bundle_app.command("sign")
def bundle_sign(
    bundle: Annotated[Path, typer.Argument(help="Bundle to re-sign.")],
    key: Annotated[Path, typer.Option("--key", help="New private signing key (PEM).")],
    out: Annotated[Path | None, typer.Option("--out", help="Write here instead of in place.")] = None,
    trust: Annotated[
        Path | None,
        typer.Option("--trust", help="Public key file or folder; the current signature must verify first."),
    ] = None,
) -> None:
    """Re-sign a bundle with another key (key rotation); the files must still match the manifest."""
    with _reported():
        store = TrustStore.from_path(trust) if trust is not None else None
        manifest = sign_bundle(bundle, load_private_key(key), out_path=out, trust=store)
    typer.echo(
        f"signed {out or bundle}: {manifest.model_name} version {manifest.version} with key {manifest.key_id}"
    )


@bundle_app.command("verify")
def bundle_verify(
    bundle: Annotated[Path, typer.Argument(help="Bundle to verify.")],
    key: Annotated[Path, typer.Option("--key", help="Trusted public key file, or a folder of *pub*.pem.")],
    retired: Annotated[
        list[str] | None, typer.Option("--retired", help="Key id that no longer verifies (repeatable).")
    ] = None,
    sha256: Annotated[
        str | None, typer.Option("--sha256", help="Expected sha256 of the bundle file.")
    ] = None,
    max_bytes: Annotated[int, typer.Option("--max-bytes", min=1, help="Refuse bundles larger than this.")] = (
        DEFAULT_MAX_BYTES
    ),
) -> None:
    """Check a bundle's structure, signature and file hashes; exit 0 only if all pass."""
    with _reported():
        store = TrustStore.from_path(key, retired=retired or ())
        manifest = verify_bundle(bundle, store, max_bytes=max_bytes, expected_sha256=sha256)
    typer.echo(f"OK: {manifest.model_name} version {manifest.version}, signed by key {manifest.key_id}")


@bundle_app.command("inspect")
def bundle_inspect(
    bundle: Annotated[Path, typer.Argument(help="Bundle to describe.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Show a bundle's manifest and integrity without checking who signed it."""
    with _reported():
        summary = inspect_bundle(bundle)
    if as_json:
        typer.echo(summary.model_dump_json(indent=2))
    else:
        table = Table(show_header=False, box=None)
        table.add_column(style="bold")
        table.add_column(overflow="fold")
        for label, value in summary_rows(summary):
            # Text, not str: values like "[model.onnx]" must not be parsed as rich markup.
            table.add_row(Text(label), Text(value))
        Console().print(table)
    if summary.integrity != "ok":
        _fail(summary.integrity)
    if not summary.signature_present:
        _fail("bundle has no valid-looking signature (manifest.sig missing or malformed)")


@bundle_app.command("to-oci")
def bundle_to_oci(
    bundle: Annotated[Path, typer.Argument(help="Signed bundle to export.")],
    out: Annotated[Path, typer.Option("--out", help="OCI image archive (oci-archive) to write.")],
    arch: Annotated[
        str, typer.Option("--arch", callback=_check_architecture, help="Platform of the image (GOARCH).")
    ] = DEFAULT_ARCHITECTURE,
    tag: Annotated[
        str | None, typer.Option("--tag", help="Image tag (org.opencontainers.image.ref.name); default: the version.")
    ] = None,
    key: Annotated[
        Path | None,
        typer.Option("--key", help="Trusted public key file or folder: the bundle must verify first."),
    ] = None,
) -> None:
    """Write a signed bundle as an OCI image (skopeo copy oci-archive:OUT docker://... pushes it)."""
    with _reported():
        trust = TrustStore.from_path(key) if key is not None else None
        image = export_oci(bundle, out, architecture=arch, ref_name=tag, trust=trust)
    typer.echo(f"exported {bundle}: {image.manifest.model_name} version {image.manifest.version}")
    _echo_image(image)


@bundle_app.command("from-oci")
def bundle_from_oci(
    archive: Annotated[Path, typer.Argument(help="OCI image archive (oci-archive) holding a bundle.")],
    key: Annotated[Path, typer.Option("--key", help="Trusted public key file, or a folder of *pub*.pem.")],
    out: Annotated[
        Path | None, typer.Option("--out", help="Write the verified bundle here (default: only verify).")
    ] = None,
    tag: Annotated[
        str | None, typer.Option("--tag", help="Image to take when the archive holds several.")
    ] = None,
    retired: Annotated[
        list[str] | None, typer.Option("--retired", help="Key id that no longer verifies (repeatable).")
    ] = None,
    max_bytes: Annotated[int, typer.Option("--max-bytes", min=1, help="Refuse archives larger than this.")] = (
        DEFAULT_MAX_BYTES
    ),
) -> None:
    """Verify the bundle inside an OCI image archive and optionally write it out; exit 0 only if all pass."""
    with _reported():
        store = TrustStore.from_path(key, retired=retired or ())
        image = extract_oci(archive, store, out, ref_name=tag, max_bytes=max_bytes)
    manifest = image.manifest
    typer.echo(f"OK: {manifest.model_name} version {manifest.version}, signed by key {manifest.key_id}")
    typer.echo(f"image digest: {image.manifest_digest}")
    if out is not None:
        typer.echo(f"bundle: {out} (sha256 {image.bundle_sha256})")


# -- registry (OCI distribution spec) -------------------------------------------------


@bundle_app.command("push")
def bundle_push(
    bundle: Annotated[Path, typer.Argument(help="Signed bundle to push.")],
    ref: Annotated[
        str, typer.Argument(help="HOST[:PORT]/NAME[:TAG]; the tag defaults to the bundle's version.")
    ],
    insecure: Annotated[
        bool, typer.Option("--insecure", help="Plain HTTP to a non-loopback registry (loopback always is).")
    ] = False,
    arch: Annotated[
        str, typer.Option("--arch", callback=_check_architecture, help="Platform of the image (GOARCH).")
    ] = DEFAULT_ARCHITECTURE,
    key: Annotated[
        Path | None,
        typer.Option("--key", help="Trusted public key file or folder: the bundle must verify first."),
    ] = None,
) -> None:
    """Push a signed bundle to an OCI registry as the image `to-oci` builds; prints its digest.

    Credentials, if the registry wants them: EDGELOOP_OCI_USERNAME / EDGELOOP_OCI_PASSWORD.
    """
    with _reported():
        from firmware_bundles.oci_registry import push  # httpx: imported only when used

        trust = TrustStore.from_path(key) if key is not None else None
        result = push(bundle, ref, insecure=insecure, architecture=arch, trust=trust)
    manifest = result.image.manifest
    typer.echo(f"pushed {bundle}: {manifest.model_name} version {manifest.version} to {result.ref}")
    typer.echo(f"layer digest: {result.image.layer_digest}")
    typer.echo(f"digest: {result.manifest_digest}")


@bundle_app.command("pull")
def bundle_pull(
    ref: Annotated[str, typer.Argument(help="HOST[:PORT]/NAME:TAG or HOST[:PORT]/NAME@sha256:DIGEST.")],
    out: Annotated[Path, typer.Option("--out", help="Write the verified bundle here.")],
    trust: Annotated[
        Path | None, typer.Option("--trust", help="Trusted public key file, or a folder of *pub*.pem (required).")
    ] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="Plain HTTP to a non-loopback registry (loopback always is).")
    ] = False,
    expect_version: Annotated[
        int | None,
        typer.Option("--expect-version", min=1, help="Refuse unless the signed bundle has this version."),
    ] = None,
    expect_name: Annotated[
        str | None, typer.Option("--expect-name", help="Refuse unless the signed bundle is this model.")
    ] = None,
    retired: Annotated[
        list[str] | None, typer.Option("--retired", help="Key id that no longer verifies (repeatable).")
    ] = None,
    max_bytes: Annotated[int, typer.Option("--max-bytes", min=1, help="Refuse blobs larger than this.")] = (
        DEFAULT_MAX_BYTES
    ),
) -> None:
    """Pull a bundle image from an OCI registry; write it only if its signature and files verify.

    Credentials, if the registry wants them: EDGELOOP_OCI_USERNAME / EDGELOOP_OCI_PASSWORD.
    """
    with _reported():
        if trust is None:
            raise ValueError("pass --trust KEYS: a pulled bundle is written only once its signature verifies")
        from firmware_bundles.oci_registry import pull  # httpx: imported only when used

        store = TrustStore.from_path(trust, retired=retired or ())
        if out.exists() and not out.is_file():
            raise ValueError(f"{out} exists and is not a file")
        # Pulled beside --out, checked, and only then moved into place.
        staging = out.with_name(f".{out.name}.pulling")
        try:
            result = pull(ref, staging, trust=store, insecure=insecure, max_blob_bytes=max_bytes)
            manifest = result.manifest
            if expect_name is not None and manifest.model_name != expect_name:
                raise ValueError(f"{ref} holds model {manifest.model_name!r}, expected {expect_name!r}")
            if expect_version is not None and manifest.version != expect_version:
                raise ValueError(
                    f"{ref} holds {manifest.model_name} version {manifest.version}, expected version {expect_version}"
                )
            staging.replace(out)
        finally:
            staging.unlink(missing_ok=True)
    typer.echo(f"OK: {manifest.model_name} version {manifest.version}, signed by key {manifest.key_id}")
    typer.echo(f"digest: {result.manifest_digest}")
    typer.echo(f"bundle: {out} (sha256 {result.bundle_sha256})")
