"""What the steps of one build share: the build context, and a typed field for what each step produces.

The pipeline creates the context; `resolve` sets the source folder, `quantize` or `export` the footprint
and what they built (and the pipeline starts the gate's reference run beside `quantize`), `verify` the report;
`write` turns it into the manifest (`builder.artifact`). This module imports no step and not the pipeline, so every
step can import it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from builder.artifact import Dequantized, Footprint, HashAhead, QuantizedLayers
from builder.plan import Plan
from builder.recipe import LoadedRecipe
from builder.verification import OnnxRecord, VerificationReport


@dataclass
class BuildContext:
    """One build. Steps write only inside `workdir`."""

    loaded: LoadedRecipe
    plan: Plan
    workdir: Path
    """Temporary folder beside the destination; the artifact's files go directly in here."""
    device: str
    """"cpu", "cuda" or "cuda:N": where the model is loaded and verified."""
    device_map: str | dict[str, Any] | None = None
    """What `from_pretrained` gets as `device_map` (bitsandbytes builds; None for exports)."""
    source_dir: Path | None = None
    """Local folder holding the source files: a Hub snapshot, or the local folder (set by `resolve`)."""
    footprint: Footprint | None = None
    quantized_layers: QuantizedLayers | None = None
    quantize_path: str | None = None
    """"stream", or "transformers (<why it could not be streamed>)"."""
    dequantized: Dequantized | None = None
    onnx: OnnxRecord | None = None
    """The export step's record (exporter, task, opset, dtype, providers, inputs, model bytes)."""
    verification: VerificationReport | None = None
    """The gate's report (set by `verify`)."""
    use_cache: bool = True
    """Whether the gate may reuse cached reference outputs (`builder build --no-cache`: recompute them)."""
    max_gpu_memory: int | None = None
    """Bytes of GPU memory the build may use (`--max-gpu-memory`); a model past it is verified block by block."""
    reference: Any = None
    """The gate's reference run (`builder.steps.verify.ReferenceRun`), started with the quantize step so the two
    overlap; `verify` waits for it."""
    hash_ahead: HashAhead | None = None
    """The artifact's files, hashed while the gate runs (started by the pipeline before `verify`)."""
    candidate: Any = None
    """The gate's candidate process, started with the quantize step so its imports overlap it; `verify` hands it
    the artifact."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per step (filled by the pipeline; steps add finer stages such as load and save)."""

    def source_folder(self) -> Path:
        """`source_dir`, which the resolve step sets before any other step runs."""
        assert self.source_dir is not None, "the resolve step sets source_dir first"
        return self.source_dir
