"""Beyond one machine: a reference set split over Ray actors, seeds run as Ray tasks.

The per-seed work of a representative interpretation has one heavy part that grows with
the reference set, the ``N x D`` by ``D x m`` product that tells which references lie on
the seed's side of each sampled boundary, and one light part that grows with nothing but
``m``: sampling the boundaries with the head. This package puts each part where it is
cheap:

- :func:`fit_sharded` runs the model over the references with Ray Data (``map_batches``
  on the workers, the model built there by a factory you give) and leaves the features in
  shards, each held by a Ray actor (in memory, or memory-mapped from the node's disk);
  :func:`shard_references` does the same with an explainer fitted locally.
- Per seed, the boundaries are sampled where the head is (only the candidates' rows are
  fetched), each actor computes the failing bits of its shard once, the greedy cover runs
  on counts summed over the shards (:func:`~captum_repinterp.solver.greedy_cover_oracle`,
  the same pick rule as the local solver), and the members and their margins are gathered
  at the end. The selection is that of the local path on the same references.
- A batch of seeds (``interpret``, ``attribute``) and the classes of an ``audit`` run as
  Ray tasks, in parallel, with the results in the same order as the local path.

The switch is one call: after ``fit_sharded(ri, ...)`` or ``shard_references(ri)`` the
explainer's ``interpret``, ``attribute`` and ``audit`` use the shards. Ray is optional:
``pip install captum_repinterp[ray]``.

Modules: ``actor`` (the Ray actor holding one shard), ``references``
(:class:`ShardedReferences`, the driver's side), ``sharding`` (:func:`shard_references`
and the steps shared with the fit), ``fit`` (:func:`fit_sharded`).
"""

from .actor import ShardLostError
from .fit import fit_sharded
from .references import ShardedReferences
from .sharding import shard_references

__all__ = ["ShardLostError", "ShardedReferences", "fit_sharded", "shard_references"]
