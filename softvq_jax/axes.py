"""Names of the device mesh's axes, in one place (no imports: the input pipeline's worker
processes read them without loading JAX).

The mesh is (data, fsdp, tensor) with sizes from `config.mesh_shape`; the batch is split over
(data, fsdp) (softvq_jax/sharding.py, softvq_jax/data.py `make_global_batch`).
"""
MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
