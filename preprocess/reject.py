"""The single error type of per-sample work, and the closed set of reject codes.

A sample becomes a record or a reject. A reject carries a stable dotted `code` (what counts,
summaries and filters group by; `tessera rejects OUT | jq 'select(.code == "image.bomb")'`)
and a human `reason` with the particulars (sizes, paths, the limit that was passed). Nothing
reads a reason back: a new kind of reject is a new code here."""

from __future__ import annotations

from tessera.preprocess.modality import MODALITIES

CODES = {
    # the manifest line itself
    "manifest.not_json": "the line is not valid JSON (or not UTF-8)",
    "manifest.not_object": "the line is JSON, but not an object",
    "manifest.too_deep": "the line is nested too deeply to parse",
    "manifest.number_too_long": "an integer of more digits than Python converts",
    "manifest.lone_surrogate": "a string holds a lone UTF-16 surrogate (no character)",
    # the row's fields
    "key.missing": "no usable key (missing, empty, or not a string or integer)",
    "label.missing": "shard.require_label, and the row has no label",
    "group.missing": "shard.group_field is set, and the row has no usable value in it",
    "label.wrong_type": "the label is not of shard.label_type (or not a string with shard.labels)",
    "label.unknown": "the label is not in shard.labels",
    "target.invalid": "a shard.targets value fails its kind's check",
    "text.wrong_type": "text is not a string",
    "text.both_given": "both text and text_file are given",
    "metadata.too_large": "the row's other fields are over shard.max_metadata_bytes as JSON",
    "metadata.not_json": "a field's value has no JSON form",
    "input.bad_path": "a file field that is not a non-empty path",
    "input.refused": "a file outside the manifest's root and shard.inputs.allow",
    "input.not_found": "a file the row names is not there",
    "input.unreadable": "a file the row names cannot be read",
    "input.empty": "a file (or inline payload) with no bytes",
    "input.too_large": "a file over shard.max_input_bytes (not read past the limit)",
    "sample.no_modality": "the row names no modality, or none is left after normalization",
    "sample.missing_modality": "a modality of shard.required_modalities is missing or empty",
    "sample.unexpected_error": "an error no check foresaw (a bug: its type and message are the reason)",
    # per modality
    "image.unrecognised": "not an image Pillow recognises",
    "image.truncated": "the image is cut short",
    "image.undecodable": "the image cannot be decoded",
    "image.format": "an image format not in shard.image.formats",
    "image.bomb": "over shard.image.max_pixels (a decompression bomb)",
    "image.too_small": "a side under shard.image.min_side",
    "image.aspect_ratio": "longer / shorter side over shard.image.max_aspect_ratio",
    "medical.no_salt": "a DICOM file, and shard.medical.id_salt is not set",
    "medical.undecodable": "a DICOM or NIfTI file whose header or pixels cannot be read",
    "medical.no_pixels": "a DICOM file with no pixel data (a report, a plan)",
    "medical.burned_in": "a DICOM file with BurnedInAnnotation YES (shard.medical.allow_burned_in off)",
    "medical.too_large": "a gzipped NIfTI over shard.medical.max_volume_bytes uncompressed",
    "text.not_utf8": "a text file that is not UTF-8 and no repair is configured",
    "text.too_long": "over shard.text.max_chars (on_too_long: reject)",
    "text.too_few_words": "under shard.text.min_words",
    "text.too_many_words": "over shard.text.max_words",
    "audio.truncated": "a WAV whose data chunk is cut short",
    "audio.format": "an audio format not in shard.audio.formats",
    "audio.too_long": "over shard.audio.max_seconds (on_too_long: reject)",
    "audio.too_short": "under shard.audio.min_seconds, or too short to be sound",
    "audio.undecodable": "the audio cannot be decoded",
    "audio.not_finite": "the audio holds NaN or infinite samples",
    "video.no_stream": "no video stream",
    "video.no_decoder": "PyAV is not installed (tessera[video])",
    "video.too_long": "over shard.video.max_seconds",
    "video.too_short": "under shard.video.min_seconds",
    "video.too_many_frames": "over shard.video.max_frames",
    "video.too_slow": "decoding took over shard.video.max_decode_seconds",
    "video.undecodable": "the video cannot be decoded, or yields no frames",
    # passes over the whole output
    "dedup.duplicate_key": "a key an earlier row (by manifest file and line) has",
    "dedup.duplicate_content": "the same bytes as an earlier row (or an earlier version's live row)",
    "dedup.near_duplicate": "a near copy of an earlier row (shard.near_dedup)",
    "curate.semantic_duplicate": "an embedding within curate.semantic.eps of an earlier row's",
    "curate.outlier": "far from its cluster's centroid (curate.outliers, drop: true)",
    "refresh.duplicate_key": "a key an earlier row of the same manifest has (tessera refresh)",
    # only what predict and serve answer (never in a shard output)
    "request.not_embeddable": "a member the model's encoder cannot read",
    "request.unknown_file_type": "a file predict does not know the modality of",
    "request.two_files": "two files of one modality for one sample stem",
    "request.bad_base64": "an inline payload that is not valid base64",
}


def unexpected(error: Exception) -> Reject:
    """The reject of an error no check foresaw (a bug, logged where it happened)."""
    return Reject("sample.unexpected_error", f"unexpected error: {type(error).__name__}: {error}")


class Reject(Exception):
    """An input that cannot become a training sample: its CODE (one of CODES), the REASON a
    person reads, and the modality it concerns (by default the code's own, for `image.*` etc.)."""

    def __init__(self, code: str, reason: str, modality: str | None = None):
        if code not in CODES:
            raise ValueError(f"unknown reject code {code!r}")
        prefix = code.split(".", 1)[0]
        self.code, self.reason = code, reason
        self.modality = modality if modality is not None else prefix if prefix in (*MODALITIES, "label") else None
        super().__init__(f"{self.modality or 'sample'}: {reason}")
