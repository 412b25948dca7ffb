"""Pure tensor math of a merge: baseline methods, conflict metrics, layer plan, dense+sparse.

No Ray and no I/O here: every function takes tensors (a *layer* is a dict name → tensor) and
returns tensors or small Python values, computing in float32 on the inputs' device.

Names load their submodule on first use (:mod:`mediator_ray.lazy_exports`): the
torch-free option models import without torch.
"""

from mediator_ray.lazy_exports import lazy_exports

_EXPORTS = {
    "ConflictMetric": "options",
    "LayerConflict": "conflict_stats",
    "deviation_from_stats": "conflict_stats",
    "extend_conflict": "conflict",
    "layer_conflict": "conflict",
    "DevicePreference": "device",
    "DeviceUnavailableError": "device",
    "select_device": "device",
    "COMPUTE_DTYPE": "dtypes",
    "cast_output": "dtypes",
    "dtype_from_name": "dtypes",
    "to_compute": "dtypes",
    "METHOD_NAMES": "options",
    "MethodName": "options",
    "MethodOptions": "options",
    "merge_layer": "methods",
    "merge_tensor": "methods",
    "tensor_seed": "methods",
    "LayerDecision": "plan",
    "LayerInfo": "plan",
    "LayerKind": "plan",
    "LayerPlan": "plan",
    "PlanOptions": "plan",
    "make_plan": "plan",
    "EncodedSparse": "sparse",
    "SparseEntries": "sparse",
    "apply_sparse": "sparse",
    "decode_sparse": "sparse",
    "decompose": "sparse",
    "decompose_layer": "sparse",
    "dense_expert": "sparse",
    "encode_sparse": "sparse",
    "encoded_nbytes": "sparse",
    "encoding_costs": "sparse_sizes",
    "estimate_encoded_nbytes": "sparse_sizes",
    "extend_dense_expert": "sparse",
    "keep_count": "sparse_sizes",
    "reconstruction_error": "sparse",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
