"""Whether two exported artefacts are the same function: a canonical digest per format.

Two exports of one model are not always byte-identical: OpenVINO names layers from a
process-wide counter (``Constant_2450``), and exporter versions and per-node debug metadata
are recorded in the files. :func:`canonical_digest` hashes each format without exactly
those, so equal digests mean the same graph with the same weights. The site uses it to
refuse any artefact that is not its own export of a model it knows
(``site_agent.parity_task``); the coordinator uses it to recognise the same artefacts again.

Parsing is defensive: the files may come from the network. ONNX is parsed as protobuf only
(never loaded into a runtime); OpenVINO XML is parsed with any DTD refused.
"""

from __future__ import annotations

import hashlib
import pyexpat
import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from typing import Any

from export.bundle_format import ARTEFACT_FILES, ArtefactFormat

__all__ = ["canonical_digest", "describe_difference"]

# Items of an OpenVINO IR's model-level rt_info that say how and where it was converted,
# not what it computes (they hold the OpenVINO version and the input file's name).
_OV_CONVERSION_INFO = frozenset({"Runtime_version", "conversion_parameters"})
_PRINTABLE = re.compile(r"[^A-Za-z0-9_.:-]")


class _Unreadable(ValueError):
    """An artefact that cannot even be parsed as its format."""


def _onnx_canonical(data: bytes) -> Any:
    """The ONNX model without what does not change its function: exporter versions, doc
    strings and the per-node debug metadata torch records."""
    import onnx
    from google.protobuf.message import DecodeError

    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except DecodeError:
        raise _Unreadable("not an ONNX model") from None
    proto.ClearField("producer_version")
    proto.ClearField("doc_string")
    proto.graph.ClearField("doc_string")
    for node in [*proto.graph.node, *(n for f in proto.functions for n in f.node)]:
        node.ClearField("doc_string")
        del node.metadata_props[:]
    return proto


def _parse_xml_without_dtd(data: bytes) -> ET.Element:
    """Parse XML, refusing any DTD.

    The attacks defusedxml guards against (entity expansion, external entities) all need a
    DTD, and an OpenVINO IR has none. Expat reports a DOCTYPE before it reads any of it,
    whatever the text's encoding, so the refusal comes first.
    """
    builder = ET.TreeBuilder()
    parser = pyexpat.ParserCreate()

    def refuse(*_: object) -> None:
        raise _Unreadable("an OpenVINO IR never declares a DTD")

    def start(tag: str, attrs: dict[str, str]) -> None:
        builder.start(tag, attrs)

    def end(tag: str) -> None:
        builder.end(tag)

    parser.StartDoctypeDeclHandler = refuse
    parser.EntityDeclHandler = refuse
    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = builder.data
    try:
        parser.Parse(data, True)
        return builder.close()
    except (pyexpat.ExpatError, AssertionError):
        raise _Unreadable("not an OpenVINO IR (XML)") from None


def _openvino_canonical(xml: bytes) -> str:
    """The IR's XML without the conversion record and the generated layer names.

    OpenVINO numbers its layers from a process-wide counter (``Constant_2450``), so two
    conversions of the same model in one process differ in names only; the edges refer to
    layer ids, which stay.
    """
    root = _parse_xml_without_dtd(xml)
    for info in root.findall("rt_info"):
        for item in list(info):
            if item.tag in _OV_CONVERSION_INFO or (
                    item.tag == "info" and item.get("name") == "OpenVINO Runtime"):
                info.remove(item)
    for layer in root.iter("layer"):
        layer.attrib.pop("name", None)
    return ET.canonicalize(ET.tostring(root, encoding="unicode"), strip_text=True)


def canonical_digest(fmt: ArtefactFormat, files: Mapping[str, bytes]) -> str:
    """SHA-256 of a format's files in a canonical form: equal digests, same function.

    Args:
        fmt: The artefact format.
        files: File name -> content, for every file of the format.

    Returns:
        The digest (hex).

    Raises:
        ValueError: A file that cannot be parsed as its format.
    """
    h = hashlib.sha256(fmt.encode())
    if fmt == "openvino":
        h.update(_openvino_canonical(files["model.xml"]).encode())
        h.update(hashlib.sha256(files["model.bin"]).digest())
    else:
        proto = _onnx_canonical(files[ARTEFACT_FILES[fmt][0]])
        h.update(proto.SerializeToString(deterministic=True))
    return h.hexdigest()


def _short(names: list[str]) -> str:
    shown = ", ".join(_PRINTABLE.sub("?", n)[:40] for n in names[:12])
    return shown + (", ..." if len(names) > 12 else "")


def describe_difference(fmt: ArtefactFormat, theirs: Mapping[str, bytes], ours: Mapping[str, bytes]
                ) -> str:
    """In a few words, how an artefact differs from the site's own export."""
    if fmt == "openvino":
        if hashlib.sha256(theirs["model.bin"]).digest() != \
                hashlib.sha256(ours["model.bin"]).digest():
            return "its weights (model.bin) differ"
        return "its graph (model.xml) differs"
    a = _onnx_canonical(theirs[ARTEFACT_FILES[fmt][0]])
    b = _onnx_canonical(ours[ARTEFACT_FILES[fmt][0]])
    ops_a, ops_b = [n.op_type for n in a.graph.node], [n.op_type for n in b.graph.node]
    if ops_a != ops_b:
        return (f"its graph has {len(ops_a)} operators ({_short(ops_a)}), the site's export "
                f"{len(ops_b)} ({_short(ops_b)})")
    weights_a = {i.name: i.SerializeToString(deterministic=True) for i in a.graph.initializer}
    weights_b = {i.name: i.SerializeToString(deterministic=True) for i in b.graph.initializer}
    if weights_a != weights_b:
        return "its weights differ"
    return "its graph's wiring, attributes or metadata differ"


