"""Pallas kernels of paged attention and of a decode step's fused layer, beside their `jnp` references.

Layout:

    reference.py    the `jnp` references: the semantics each kernel reproduces (and pdopt's attention on CPU)
    api.py          `ragged_paged_attention`, the model's attention, and the choice of backend (`dispatch`)
    mixed_batch.py  a ragged batch of prompt chunks and decodes through the two attention kernels in one call
                    (GPU)
    ragged_paged/   the same batch in one kernel on TPU (`pallas_tpu.py`: Mosaic TPU, also run in TPU
                    interpret mode on CPU; `tuning.py`: block sizes by TPU generation)
    flash_prefill/  one folder per kernel, one file per backend (`pallas_triton.py`: Triton lowering, also
    paged_decode/   run by the Pallas interpreter; `pallas_mgpu.py`: Mosaic GPU); `__init__` is the entry
    fused_layer/    point and picks the backend where there are two; `paged_decode/common.py` holds what its
    fused_mlp/      two backends share, `flash_prefill/tuning.py` the Triton prefill kernel's tuning table;
                    `fused_mlp` is not used by the model yet (NOTES.md)
    gpu_info.py     what the kernels ask of the GPU (SM count, sm_90)
    mosaic_util.py  sm_90 facts and helpers of the Mosaic GPU kernels; triton_util.py, of the Triton ones
    sizes.py        power-of-two block sizes
    NOTES.md        design notes and measurements of every kernel

Letter legend of shapes and einsums, here and in `pdopt.models` (which points here):

    B batch          T tokens (the flat rows of a ragged batch)     S sequences      L layers
    H query heads    K KV heads       G query heads per KV head (H = K * G)          D head dim
    P pages          E embed          F MLP width                   V vocab
    Q query tokens per sequence of a decode step (1, or k + 1 verifying k speculated tokens)
    J key positions of a sequence
    R the G + 2 rows of one KV head in the merged q/k/v projection: its G query heads, its key, its value
    C the two halves of the merged gate/up projection: gate, up

A kernel's tiles name their own sizes where they are defined (e.g. M, the query rows of a decode program).
"""
