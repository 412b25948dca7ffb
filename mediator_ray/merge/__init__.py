"""Pure tensor math of a merge: baseline methods, conflict metrics, layer plan, dense+sparse.

No Ray and no I/O here: every function takes tensors (a *layer* is a dict name → tensor) and
returns tensors or small Python values, computing in float32 on the inputs' device.
"""

from mediator_ray.merge.conflict import (
    ConflictMetric,
    LayerConflict,
    deviation_from_stats,
    extend_conflict,
    layer_conflict,
)
from mediator_ray.merge.device import DevicePreference, DeviceUnavailableError, select_device
from mediator_ray.merge.dtypes import COMPUTE_DTYPE, cast_output, dtype_from_name, to_compute
from mediator_ray.merge.methods import (
    METHOD_NAMES,
    MethodName,
    MethodOptions,
    merge_layer,
    merge_tensor,
    tensor_seed,
)
from mediator_ray.merge.plan import (
    LayerDecision,
    LayerInfo,
    LayerKind,
    LayerPlan,
    PlanOptions,
    make_plan,
)
from mediator_ray.merge.sparse import (
    EncodedSparse,
    SparseEntries,
    apply_sparse,
    decode_sparse,
    decompose,
    decompose_layer,
    dense_expert,
    encode_sparse,
    encoded_nbytes,
    encoding_costs,
    estimate_encoded_nbytes,
    extend_dense_expert,
    keep_count,
    reconstruction_error,
)

__all__ = [
    "COMPUTE_DTYPE",
    "METHOD_NAMES",
    "ConflictMetric",
    "DevicePreference",
    "DeviceUnavailableError",
    "EncodedSparse",
    "LayerConflict",
    "LayerDecision",
    "LayerInfo",
    "LayerKind",
    "LayerPlan",
    "MethodName",
    "MethodOptions",
    "PlanOptions",
    "SparseEntries",
    "apply_sparse",
    "cast_output",
    "decode_sparse",
    "decompose",
    "decompose_layer",
    "dense_expert",
    "deviation_from_stats",
    "dtype_from_name",
    "encode_sparse",
    "encoded_nbytes",
    "encoding_costs",
    "estimate_encoded_nbytes",
    "extend_conflict",
    "extend_dense_expert",
    "keep_count",
    "layer_conflict",
    "make_plan",
    "merge_layer",
    "merge_tensor",
    "reconstruction_error",
    "select_device",
    "tensor_seed",
    "to_compute",
]
